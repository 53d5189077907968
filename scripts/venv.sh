# Sourced by course.sh and test.sh: create the virtual environment when it is missing and install
# sdcourse with its test tools into it (again only when the requirements changed).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SDCOURSE_VENV:-$ROOT/.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha1sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.sdcourse-installed" 2>/dev/null)" != "$want" ]; then
  echo "Installing sdcourse into $VENV (log: $VENV/install.log) ..."
  # torch goes on the same pip line as everything else: asked for only indirectly, pip would pick
  # the newest CUDA build (several GB). A torch already in the venv (say a CUDA build) is kept.
  torch_spec=${SDCOURSE_TORCH:-torch==2.13.0}
  "$VENV/bin/python" -c "import torch" 2>/dev/null && torch_spec=""
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check $torch_spec -e "$ROOT[dev]" >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "pip install failed; full log: $VENV/install.log"; exit 1
  fi
  echo "$want" > "$VENV/.sdcourse-installed"
fi
