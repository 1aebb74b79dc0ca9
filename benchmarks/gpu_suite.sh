#!/usr/bin/env bash
# The GPU checks and benchmarks in one pass on a CUDA machine, each stage under its own time limit.
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [STAGE ...]
#   stages: tests layer profile ops train gen gen-fla  (default: tests layer train gen)
#   env: TESTS_LIMIT LAYER_LIMIT TRAIN_LIMIT TRAIN_STEPS TRAIN_PRESETS GEN_LIMIT TESTS_ARGS GEN_ARGS
# Logs and JSON land in OUT_DIR; a stage that fails or runs out of time does not stop the next one.
set -uo pipefail
out="${1:-benchmarks/results}"
shift || true
stages="${*:-tests layer train gen}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3

stage() {  # stage NAME SECONDS CMD...: run CMD with a limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" bash -c "$*" > "$out/$name.log" 2>&1
  echo "=== $name exit $? $(date +%T)"
  tail -n 40 "$out/$name.log"
}

train_run() {  # train_run PRESET: a short bf16 run of a model preset on repository text (throughput, memory)
  local preset=$1 corpus=/tmp/memmix_corpus.txt
  [ -s "$corpus" ] || for _ in 1 2 3 4 5 6; do find memmix tests benchmarks -name '*.py' -exec cat {} + ; done > "$corpus"
  $py -m memmix.cli train --model "$preset" --data "$corpus" --seq-len 2048 --micro-batch-size 8 \
      --max-steps "${TRAIN_STEPS:-30}" --warmup-steps 5 --log-every 10 --save-every 100000 --no-save-hf \
      --no-progress --no-tensorboard --out-dir "/tmp/run_$preset" --overwrite \
    && $py -c "import json,sys; r=[json.loads(l) for l in open('/tmp/run_$preset/metrics.jsonl')]; \
t=[x for x in r if x.get('kind')=='train']; print('RESULT', '$preset', json.dumps(t[-1]))"
}

export -f train_run
export py out
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" | tee -a "$out/device.txt"
for s in $stages; do
  case $s in
    tests) stage gpu_tests "${TESTS_LIMIT:-240}" $py -m pytest -q -m gpu -p no:cacheprovider --durations=20 ${TESTS_ARGS:-tests} ;;
    layer) stage layer_speed "${LAYER_LIMIT:-240}" $py benchmarks/layer_speed.py --json "$out/layer_speed.json" ;;
    profile) stage profile_layer 90 $py benchmarks/profile_layer.py --json "$out/profile_layer.json" ;;
    ops) stage ops_gpu 150 $py benchmarks/ops_gpu.py --json "$out/ops_gpu.json" ;;
    train) for p in ${TRAIN_PRESETS:-mom-340m gdn-340m attention-340m}; do stage "train_$p" "${TRAIN_LIMIT:-100}" train_run "$p"; done ;;
    gen) stage generation "${GEN_LIMIT:-240}" $py benchmarks/generation.py --no-fla --json "$out/generation.json" \
           ${GEN_ARGS:-} ;;
    gen-fla) stage generation_fla 200 $py benchmarks/generation.py --only fla --batch-sizes 16 --prompts 512 \
               --repeats 1 --json "$out/generation_fla.json" ;;
    *) echo "unknown stage $s (tests layer profile ops train gen gen-fla)" ;;
  esac
done
