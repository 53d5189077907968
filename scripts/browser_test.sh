#!/usr/bin/env bash
# The course's panels in a real browser, as a learner meets them on Colab: Jupyter classic
# (notebook 6.5) with ipywidgets 7.7.1, headless Chromium, on 127.0.0.1. Takes a few minutes (its
# own venv, .venv-browser, on first use); not part of scripts/test.sh. Screenshots and a log go to
# outputs/browser/. Needs Debian's chromium and chromium-driver:
#   apt-get update && apt-get install -y chromium chromium-driver
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SDCOURSE_BROWSER_VENV:-$ROOT/.venv-browser}
for tool in chromium chromedriver; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get update && apt-get install -y chromium chromium-driver"; exit 1; }
done
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
want=$(cat "$ROOT/pyproject.toml" "$ROOT/requirements.txt" "$0" | sha1sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.sdcourse-installed" 2>/dev/null)" != "$want" ]; then
  echo "Installing sdcourse, notebook 6.5 and ipywidgets 7.7.1 into $VENV (log: $VENV/install.log) ..."
  torch_spec=${SDCOURSE_TORCH:-torch==2.13.0}
  "$VENV/bin/python" -c "import torch" 2>/dev/null && torch_spec=""
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check $torch_spec -e "$ROOT" \
      "notebook>=6.5,<6.6" "ipywidgets==7.7.1" ipykernel selenium >"$VENV/install.log" 2>&1; then
    tail -n 30 "$VENV/install.log"; echo "pip install failed; full log: $VENV/install.log"; exit 1
  fi
  echo "$want" > "$VENV/.sdcourse-installed"
fi
exec "$VENV/bin/python" "$ROOT/scripts/browser_test.py" "$@"
