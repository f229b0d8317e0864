#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one H200, everything under one work
# directory (default runs/gpu-check-<time>) and at most 8 result files under --pack DIR.
# See scripts/gpu_check.py for the steps.
#   scripts/gpu_check.sh [--out DIR] [--pack DIR] [--wheels DIR] [--skip STEPS]
#                        [--bench-configs NAMES] [--realdata DIR] [--dry-run] [--cpu]
# --wheels DIR: install from carried wheels (no registry is ever used); --dry-run: check
# the plan on any machine; --cpu: the wiring check, every step on a CPU at tiny sizes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# the hard stop behind the script's own deadline (it packs the results before this)
LIMIT=480
for a in "$@"; do [ "$a" = "--cpu" ] && LIMIT=2400; done
exec timeout --kill-after=10 "$LIMIT" "$PY" scripts/gpu_check.py "$@"
