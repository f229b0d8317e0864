#!/usr/bin/env bash
# Create .venv and install starpo with torch pinned (an unpinned torch may resolve to any
# build). Which build is scripts/torch_build.py's decision, printed with its reason: on
# Linux without an NVIDIA GPU the CPU build from PyTorch's CPU index (PyPI's Linux wheel is
# the CUDA one, GBs of NVIDIA libraries), with an NVIDIA GPU the CUDA build from PyPI, on
# macOS/Windows PyPI's wheel (CPU there). Idempotent: an installed torch is kept.
# Usage: scripts/setup.sh [extras, e.g. dev,bench]
# Environment: STARPO_TORCH_BUILD=auto|cpu|cuda, STARPO_TORCH_INDEX_URL (a mirror of the
# CPU index), STARPO_TORCH_VERSION (default 2.13.0), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
PY="${PYTHON:-python3}"
TORCH_VERSION="${STARPO_TORCH_VERSION:-2.13.0}"
plan="$("$PY" scripts/torch_build.py --shell)" || exit 2
eval "$plan"          # TORCH_BUILD, TORCH_INDEX, TORCH_REASON
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip

# "<version> <cpu|cuda>" of the torch in .venv, or nothing
torch_now() {
  python -c "import torch; print(torch.__version__, 'cuda' if torch.version.cuda else 'cpu')" \
    2>/dev/null || true
}
now="$(torch_now)"
if [ -n "$now" ]; then
  echo "torch ${now% *} (${now##* } build) is already in .venv: kept"
  if [ "${now##* }" != "$TORCH_BUILD" ]; then
    echo "note: this machine would get the $TORCH_BUILD build ($TORCH_REASON);" \
         "rm -rf .venv && scripts/setup.sh installs it"
  fi
else
  echo "installing torch $TORCH_VERSION, the $TORCH_BUILD build: $TORCH_REASON"
  args=("torch==$TORCH_VERSION")
  if [ -n "$TORCH_INDEX" ]; then
    args+=(--index-url "$TORCH_INDEX")
    if ! python scripts/torch_build.py --reachable "$TORCH_INDEX"; then
      # pip would retry for minutes; its configured sources (find-links, extra indexes)
      # may still hold the CPU wheel
      echo "note: $TORCH_INDEX is unreachable from here; looking in pip's configured sources"
      args+=(--retries 0)
    fi
  fi
  if ! python -m pip install -q "${args[@]}"; then
    echo "error: could not install the $TORCH_BUILD build of torch $TORCH_VERSION" \
         "${TORCH_INDEX:+from $TORCH_INDEX}. Set STARPO_TORCH_INDEX_URL to a mirror of that" \
         "index, or STARPO_TORCH_BUILD=cuda for PyPI's default build (CUDA libraries," \
         "about 5.7 GB installed)" >&2
    exit 1
  fi
  now="$(torch_now)"
  if [ "${now##* }" != "$TORCH_BUILD" ]; then
    echo "warning: pip installed torch ${now% *}, the ${now##* } build, not the" \
         "$TORCH_BUILD build" >&2
  fi
fi
python -m pip install -q -e ".[${EXTRAS}]"
python - <<'PY'
import torch, transformers, starpo
build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
print(f"starpo {starpo.__version__}: torch {torch.__version__} ({build}), "
      f"transformers {transformers.__version__}")
PY
