#!/usr/bin/env bash
# One time-boxed GPU session: install what the CUDA machine lacks from carried wheels (.whl/: deepspeed,
# hydra-core, omegaconf, antlr4, pydantic, hjson, liger-kernel; libaio debs), then run the GPU tests and
# benchmarks, each under its own time limit, most important first, and print a short table. Results land in
# bench/results/ (GPU files end in _gpu.json or hold a "cuda" entry) and, when $OUT is set, are copied there
# after every step, so a cut-off run still returns what it measured.
#   bash bench/gpu_check.sh            (on a machine with a CUDA GPU; about 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# DeepSpeed 0.19.8's op builder cannot parse arch names like "9.0a" (ValueError: invalid literal for int());
# async_io has no CUDA code, so a plain arch list is enough
export TORCH_CUDA_ARCH_LIST="${RUNX_CUDA_ARCH_LIST:-9.0}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  for f in .whl/*.deb; do dpkg -x "$f" /; done; ldconfig
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
  || { echo "runx install failed"; exit 1; }
export PYTHONPATH=/tmp/site
mkdir -p bench/results
LOG=bench/results/gpu_check.log
: > "$LOG"
# DeepSpeed's async_io op (NVMe offload) JIT-builds in the background while the first steps run
(cd /tmp && python3 -m runx.trainers.nvme --build-aio > /tmp/aio_build.log 2>&1) &
AIO_PID=$!
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch, triton, deepspeed, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

# $OUT returns at most 8 files: the GPU results only
GPU_FILES="kernels_sinkhorn_gpu.json swav_small_gpu.json trainer_overhead.json offload.json"
save() { [ -n "${OUT:-}" ] || return 0; for f in $GPU_FILES; do [ -f "bench/results/$f" ] && cp "bench/results/$f" "$OUT"/; done
         cp "$LOG" "$OUT"/; true; }
ONLY="${1:-all}"   # all | offload (trainer overhead + offload rows only)
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  case "$ONLY:$name" in all:*|offload:trainer*|offload:offload*) ;; *) return 0 ;; esac
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tail -n 25 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  RESULTS+=("$name rc=$rc $(( $(date +%s) - t ))s")
  save
}
RESULTS=()
step "gpu tests" 75 python3 -m pytest -q -x -m gpu tests/test_kernels.py -p no:cacheprovider
step "sinkhorn" 40 python3 bench/kernels.py --device cuda --only sinkhorn --out bench/results/kernels_sinkhorn_gpu.json
step "swav resnet50 amp_bf16 vs plain" 75 python3 bench/swav_small.py --gpu --gpu-steps 12
wait $AIO_PID; echo "async_io build: $(tail -1 /tmp/aio_build.log)" | tee -a "$LOG"
# measured 2026-11-26 on an H100: zero3 + zero3_cpu_offload took ~115 s; zero3_nvme alone did not finish in 75 s
# (0.3B bf16 params + fp32 states through the disk each step), so give it its own call if time is short
step "trainer overhead (GPU)" "${TO_LIMIT:-150}" python3 bench/trainer_overhead.py --device cuda --model gpu_llama \
  --trainers "${TO_TRAINERS:-zero3,zero3_cpu_offload,zero3_nvme}" --rounds 2 --steps 6
step "offload (GPU)" "$(( ${OFFLOAD_BUDGET:-110} + 20 ))" python3 bench/offload.py --device cuda --quick --budget-s "${OFFLOAD_BUDGET:-110}"

echo; echo "summary ($(( $(date +%s) - T0 ))s total):" | tee -a "$LOG"
for r in "${RESULTS[@]}"; do echo "  $r" | tee -a "$LOG"; done
save
exit 0
