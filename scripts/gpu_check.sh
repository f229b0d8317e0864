#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one H200, everything under one
# directory (default runs/gpu-check-<time>). See scripts/gpu_check.py for the steps.
#   scripts/gpu_check.sh [--out DIR] [--wheels DIR] [--dry-run]
# --wheels DIR: install from carried wheels (no registry access); --dry-run: check the plan
# and list the installs it would make, on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
