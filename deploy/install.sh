#!/usr/bin/env bash
# Install dicom-ai-node into ./.venv of this checkout. Idempotent: safe to run again after a pull.
#   deploy/install.sh          the node with its model runtime (torch, MONAI, ONNX Runtime)
#   deploy/install.sh --dev    plus the test tools
# torch is installed first, pinned, so MONAI does not pull another build: TORCH_SPEC (default ==2.13.0)
# chooses it; on a GPU server with a CUDA driver pip's default torch build for Linux is the CUDA one, and
# e.g. TORCH_SPEC='==2.13.0' PIP_INDEX_URL=https://download.pytorch.org/whl/cpu keeps a CPU-only host small.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=()
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch${TORCH_SPEC:-==2.13.0}"
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
.venv/bin/python -m pip install -q -e "$spec"
echo "installed: $(.venv/bin/dicom-ai-node --version) in $(pwd)/.venv"
