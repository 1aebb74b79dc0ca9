#!/usr/bin/env bash
# One pass on a CUDA machine: GPU tests, then the layer, op and generation benchmarks.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (logs and JSON land in OUT_DIR, default benchmarks/results)
set -uo pipefail
out="${1:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 25 | tee "$out/gpu_tests.log"
python3 benchmarks/layer_speed.py --json "$out/layer_speed.json" 2>&1 | tee "$out/layer_speed.log"
python3 benchmarks/generation.py --json "$out/generation.json" ${GEN_ARGS:-} 2>&1 | tee "$out/generation.log"
