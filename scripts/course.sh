#!/usr/bin/env bash
# The whole course path on the sample data with the tiny model on CPU. Creates .venv when missing.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
SDCOURSE_SMOKE=1 exec "$VENV/bin/python" -m sdcourse.course "$@"
