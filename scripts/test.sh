#!/usr/bin/env bash
# The whole test suite, every notebook executed in smoke mode included. Creates .venv when missing.
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
# One worker per core, each test file whole on one worker (the notebooks of test_notebooks.py hand over
# in order); torch in each worker then runs on one thread (tests/conftest.py). `-n 0` runs in one process.
exec "$VENV/bin/python" -m pytest -n auto --dist loadfile "$@"
