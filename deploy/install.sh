#!/usr/bin/env bash
# Install dicom-ai-node into ./.venv of this checkout. Idempotent: safe to run again after a pull.
#   deploy/install.sh          the node (classical pipelines run on CPU)
#   deploy/install.sh --dev    plus the test tools
#   deploy/install.sh --gpu    plus torch and MONAI (torch first, so MONAI does not pull another build)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=()
gpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --gpu) gpu=1; extras+=(gpu) ;;
    *) echo "usage: $0 [--dev] [--gpu]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$gpu" = 1 ]; then
  .venv/bin/python -m pip install -q "torch${TORCH_SPEC:-==2.13.0}"
fi
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
.venv/bin/python -m pip install -q -e "$spec"
echo "installed: $(.venv/bin/dicom-ai-node --version) in $(pwd)/.venv"
