#!/usr/bin/env bash
# The whole test suite, every notebook executed in smoke mode included. Creates .venv when missing.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
