# Sourced by course.sh and test.sh: create the virtual environment when it is missing and install
# sdcourse with its test tools into it (again only when the requirements changed).
#
# SDCOURSE_LANE picks the package versions:
#   main  (default) .venv:       the newest releases the requirements allow, this machine's python3.
#   colab           .venv-colab: Google Colab's preinstalled versions (.ci/colab-versions.txt) on
#                   Python 3.13, Colab's Python, when pyenv or PATH has it; tiny models built apart.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LANE=${SDCOURSE_LANE:-main}
constraints=()
case "$LANE" in
  main)
    VENV=${SDCOURSE_VENV:-$ROOT/.venv}
    python=${PYTHON:-python3} ;;
  colab)
    VENV=${SDCOURSE_VENV:-$ROOT/.venv-colab}
    constraints=(-c "$ROOT/.ci/colab-versions.txt")
    # The tiny models are saved by the lane's own transformers and diffusers, as on Colab.
    export SDCOURSE_CACHE=${SDCOURSE_CACHE:-$VENV/sdcourse-cache}
    python=${PYTHON:-}
    if [ -z "$python" ]; then
      for candidate in "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.13*/bin/python3 "$(command -v python3.13 || true)"; do
        if [ -x "$candidate" ] && "$candidate" -c "import sys" 2>/dev/null; then python=$candidate; break; fi
      done
    fi
    if [ -z "$python" ]; then
      python=python3
      echo "Colab lane: no Python 3.13 here (pyenv, PATH); using $(python3 --version)."
    fi ;;
  *) echo "SDCOURSE_LANE must be main or colab, not '$LANE'"; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "${constraints[@]:1}" \
       | sha1sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.sdcourse-installed" 2>/dev/null)" != "$want" ]; then
  echo "Installing sdcourse into $VENV ($LANE lane, $("$VENV/bin/python" --version); log: $VENV/install.log) ..."
  # torch goes on the same pip line as everything else: asked for only indirectly, pip would pick
  # the newest CUDA build (several GB). A torch already in the venv (say a CUDA build) is kept.
  torch_spec=${SDCOURSE_TORCH:-torch==2.13.0}
  "$VENV/bin/python" -c "import torch" 2>/dev/null && torch_spec=""
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check $torch_spec "${constraints[@]}" \
       -e "$ROOT[dev]" >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "pip install failed; full log: $VENV/install.log"; exit 1
  fi
  echo "$want" > "$VENV/.sdcourse-installed"
fi
