#!/usr/bin/env bash
# Create .venv and install starpo with the CPU build of torch (pinned: an unpinned torch
# pulls a multi-GB CUDA build). Idempotent. Usage: scripts/setup.sh [extras, e.g. dev,bench]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned, so nothing later resolves it to a CUDA wheel
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${STARPO_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[${EXTRAS}]"
python -c "import torch, transformers, starpo; print(f'starpo {starpo.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
