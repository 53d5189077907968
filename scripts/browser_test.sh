#!/usr/bin/env bash
# The course's panels in a real browser, headless Chromium on 127.0.0.1, in one of two frontends:
#   --jupyter classic (default): as a learner meets them on Colab, Jupyter classic (notebook 6.5)
#                                with ipywidgets 7.7.1; its own venv, .venv-browser.
#   --jupyter lab:               as a local learner meets them, Jupyter Notebook 7 (JupyterLab 4)
#                                with ipywidgets 8, the newest the requirements allow; .venv-browser-lab.
# SDCOURSE_BROWSER_JUPYTER=lab does the same as --jupyter lab. Takes a few minutes (the venv on first
# use); not part of scripts/test.sh. Screenshots and a log go to outputs/browser/<frontend>/.
# Needs Debian's chromium and chromium-driver:
#   apt-get update && apt-get install -y chromium chromium-driver
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JUPYTER=${SDCOURSE_BROWSER_JUPYTER:-classic}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --jupyter) JUPYTER=${args[i + 1]:-} ;;
    --jupyter=*) JUPYTER=${args[i]#--jupyter=} ;;
  esac
done
case "$JUPYTER" in
  classic) VENV=${SDCOURSE_BROWSER_VENV:-$ROOT/.venv-browser}
           frontend=("notebook>=6.5,<6.6" "ipywidgets==7.7.1") ;;
  lab)     VENV=${SDCOURSE_BROWSER_VENV:-$ROOT/.venv-browser-lab}
           frontend=("notebook>=7,<8" "ipywidgets>=8,<9") ;;
  *) echo "--jupyter must be classic or lab, not '$JUPYTER'"; exit 2 ;;
esac
for tool in chromium chromedriver; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get update && apt-get install -y chromium chromium-driver"; exit 1; }
done
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
want=$( (cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt"; echo "${frontend[@]}") | sha1sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.sdcourse-installed" 2>/dev/null)" != "$want" ]; then
  echo "Installing sdcourse, ${frontend[*]} into $VENV (log: $VENV/install.log) ..."
  torch_spec=${SDCOURSE_TORCH:-torch==2.13.0}
  "$VENV/bin/python" -c "import torch" 2>/dev/null && torch_spec=""
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check $torch_spec -e "$ROOT" \
      "${frontend[@]}" ipykernel selenium >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "pip install failed; full log: $VENV/install.log"; exit 1
  fi
  echo "$want" > "$VENV/.sdcourse-installed"
fi
exec "$VENV/bin/python" "$ROOT/scripts/browser_test.py" --jupyter "$JUPYTER" "$@"
