#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite (CPU only; GPU tests skip).
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
exec python -m pytest -q "$@"
