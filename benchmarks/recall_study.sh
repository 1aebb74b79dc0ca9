#!/usr/bin/env bash
# The GPU recall study (preset zoology: Zoology's MQAR protocol) in parts that each fit one device call.
#
#   bash benchmarks/recall_study.sh OUT_DIR [RESULTS_JSON]
#
# Continues the runs in RESULTS_JSON (when given and present: the file an earlier call brought back), starts new
# runs for BUDGET_MIN minutes (a run measured to end after that waits for the next call), and leaves in OUT_DIR:
#   recall_<preset>.json        every finished run so far (written as each finishes; pass it back next time)
#   recall_<preset>.txt         the table, the summary line and the estimate of what is left
#   recall_<preset>.png         accuracy per (seq_len, pairs);  recall_<preset>_state.png: Zoology's state plot
# Exit 0 with "N of M runs left" while the grid is unfinished; the next call continues it.
# TIMEOUT_S sends Ctrl-C (SIGINT) to the runner: its workers stop at once, finished runs stay in the JSON, and
# the runs in progress are trained again by the next call.
# Env (defaults): PRESET (zoology), DEVICE (cuda), WORKERS (8 runs at once on the GPU), BUDGET_MIN (6),
#   TIMEOUT_S (530), PYTHON (python3), OVERRIDES (a JSON object of RecallSettings fields, for a tiny dry run:
#   PRESET=zoology DEVICE=cpu WORKERS=2 OVERRIDES='{"d_models": [16], "head_dim": 8, ...}'),
#   MPS (0; 1: run the workers under an MPS daemon this script starts and stops, so that their kernels share the
#   GPU at once: use it when benchmarks/train_step.py measured the mps mode faster than plain processes).
set -euo pipefail
out=${1:?usage: bash benchmarks/recall_study.sh OUT_DIR [RESULTS_JSON]}
resume=${2:-}
preset=${PRESET:-zoology}
mkdir -p "$out"
json="$out/recall_${preset}.json"
if [ -n "$resume" ] && [ -f "$resume" ] && ! [ "$resume" -ef "$json" ]; then
  cp "$resume" "$json"
fi
export PYTHONUNBUFFERED=1 PRESET="$preset"
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  mps=$(mktemp -d)
  export CUDA_MPS_PIPE_DIRECTORY="$mps/pipe" CUDA_MPS_LOG_DIRECTORY="$mps/log"
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT && echo "=== MPS daemon started"
fi
echo "=== recall study: preset $preset, $(date +%T), results $json"
status=0
timeout -s INT -k 30 "${TIMEOUT_S:-530}" "${PYTHON:-python3}" benchmarks/recall_study.py "$json" || status=$?
echo "=== recall study: exit $status $(date +%T)"
exit $status
