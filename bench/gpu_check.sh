#!/usr/bin/env bash
# The one prepared GPU check: every GPU figure of the project in a few minutes, offline (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh [--smoke] [--data DIR] [--budget SECONDS] [--out DIR]
#
# On a machine with PyTorch, torchvision, timm, transformers, onnx, onnxscript and onnxruntime only: the other
# packages come as wheel files in $WHEELS (default .whl/; make them with `make gpu-wheels` where there is a
# network) and are installed into .gpu_site/ (no network, no dependencies resolved). An unpacked
# onnxruntime-gpu goes first on the path when $ORT_GPU names its folder. Training data: --data (default
# ../shared/data/flowers5). Results: bench/results/gpu_check.{md,json} and gpu_check_*.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ! "$PYTHON" -c "import open_clip" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "error: open_clip is not installed and $WHEELS/ has no wheels (run 'make gpu-wheels' where there is a network)" >&2
        exit 2
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --target .gpu_site "$WHEELS"/*.whl
    export PYTHONPATH=".gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${ORT_GPU:-}" ]; then
    export PYTHONPATH="$ORT_GPU${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
