#!/usr/bin/env bash
# One time-boxed GPU session: install what the CUDA machine lacks from carried wheels (.whl/: deepspeed,
# hydra-core, omegaconf, antlr4, pydantic, hjson, liger-kernel; libaio debs), then run the GPU tests and
# benchmarks, each under its own time limit, and print a short table. Results land in bench/results/ and,
# when $OUT is set, are copied there.
#   bash bench/gpu_check.sh            (on a machine with a CUDA GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  for f in .whl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
  || { echo "runx install failed"; exit 1; }
export PYTHONPATH=/tmp/site
mkdir -p bench/results
LOG=bench/results/gpu_check.log
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton, deepspeed, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tail -n 40 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  RESULTS+=("$name rc=$rc $(( $(date +%s) - t ))s")
}
RESULTS=()
step "gpu tests (kernels)" 120 python3 -m pytest -q -x -m gpu tests/test_kernels.py -p no:cacheprovider
step "bench kernels" 170 python3 bench/kernels.py --device cuda
step "bench trainer overhead (GPU)" 150 python3 bench/trainer_overhead.py --device cuda --model gpu_llama \
  --trainers zero3,zero3_cpu_offload --rounds 2 --steps 8
[ -f bench/offload.py ] && step "bench offload (GPU)" 150 python3 bench/offload.py --device cuda --quick
[ -f bench/swav_small.py ] && step "bench swav resnet50 (GPU)" 90 python3 bench/swav_small.py --gpu

echo; echo "summary ($(( $(date +%s) - T0 ))s total):"
for r in "${RESULTS[@]}"; do echo "  $r"; done
if [ -n "${OUT:-}" ]; then cp bench/results/*.json bench/results/gpu_check.log "$OUT"/ 2>/dev/null; fi
exit 0
