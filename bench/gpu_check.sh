#!/usr/bin/env bash
# One time-boxed GPU session: install what the CUDA machine lacks from carried wheels (.whl/: deepspeed,
# hydra-core, omegaconf, antlr4, pydantic, hjson, liger-kernel; libaio debs), then run the GPU tests and
# benchmarks, each under its own time limit, most important first, and print a short table. Results land in
# bench/results/ (GPU files end in _gpu.json or hold a "cuda" entry) and, when $OUT is set, are copied there
# after every step, so a cut-off run still returns what it measured.
#   bash bench/gpu_check.sh [tests,kernels,sinkhorn,overhead,offload]   (default: all but sinkhorn;
#        DEADLINE=540 s by default). A second, shorter call picks what to re-run:
#   OFFLOAD_ARMS=a,b  TO_TRAINERS=zero3,zero3_nvme  TO_ROUNDS=1  TO_STEPS=4  TO_ARGS=--phases  GPU_TESTS=tests/test_kernels.py
# Measured on an H100 (runs 1-8): every offload arm but raw nvme_params; trainer overhead for zero3 (1.03),
# zero3_cpu_offload (0.98) and zero3_nvme (0.97, 0.80); the log-prob table at 4 shapes. On an H200 (runs 9, 10,
# 2026-11-27): all 17 GPU tests; the log-prob table and sweeps, including dw_accum="weight"; zero3_nvme 0.979 and
# 0.987 with --phases (runx's own loop work outside DeepSpeed's calls: ~4 ms of a ~4.5 s step). The bench since
# then warms the process up with an untimed raw run, removes each side's swap files before the other side runs,
# and frees each engine (Trainer.close / ds_patches.release_engine). Next: the zero3_nvme row again,
#   DEADLINE=420 TO_ROUNDS=4 TO_STEPS=5 TO_LIMIT=400 bash bench/gpu_check.sh overhead   (one round: ~90 s)
# The logprob group runs only the log-prob part (4 shapes, the 32k x 152k sweep, the 8k x 32k weighted-sum sweep);
# its 4-shape table has a runx_wsum_lean column since run 10 (dw_accum="weight", chunk <= max(N/8, 1024)):
#   bash bench/gpu_check.sh tests,logprob,overhead
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
echo "setup (wheels, runx install) took $(( $(date +%s) - T0 ))s" | tee -a "$LOG"

# $OUT returns at most 8 files: the GPU results only
GPU_FILES="kernels.json kernels_sinkhorn_gpu.json kernels_logprob_gpu.json trainer_overhead.json offload.json"
save() { [ -n "${OUT:-}" ] || return 0; for f in $GPU_FILES; do [ -f "bench/results/$f" ] && cp "bench/results/$f" "$OUT"/; done
         cp "$LOG" "$OUT"/; true; }
# one device session is time-boxed: DEADLINE (seconds after start) caps every step and the offload budget
DEADLINE="${DEADLINE:-540}"
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
ONLY=",${1:-tests,kernels,overhead,offload},"   # comma list of: tests kernels logprob sinkhorn overhead offload
step() {  # step GROUP NAME SECONDS CMD...
  local group=$1 name=$2 limit=$3; shift 3
  case "$ONLY" in *",$group,"*) ;; *) return 0 ;; esac
  local l=$(( $(left) - 5 ))
  [ "$l" -lt 20 ] && { echo "=== $name skipped (deadline)" | tee -a "$LOG"; RESULTS+=("$name skipped"); return 0; }
  [ "$limit" -gt "$l" ] && limit=$l
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tail -n 40 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$LOG"
  RESULTS+=("$name rc=$rc $(( $(date +%s) - t ))s")
  save
}
RESULTS=()
step tests "gpu tests" 120 python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/test_kernels.py tests/test_lora_ga.py} -p no:cacheprovider
# logprob at 4 LLM shapes + variants at 32k x 152k vs Liger; Sinkhorn fused vs column-strip path vs eager + variants
step kernels "kernels bench" 180 python3 bench/kernels.py --device cuda --logprob-sweep --sinkhorn-sweep \
  --out bench/results/kernels.json
# linear_logprob alone: the 4 shapes (Triton, torch, gradient-in-forward, eager, Liger), the 32k x 152k sweep and
# the 8k x 32k weighted-sum chunk sweep
step logprob "logprob bench" 150 python3 bench/kernels.py --device cuda --only logprob --logprob-sweep \
  --out bench/results/kernels_logprob_gpu.json
# Sinkhorn alone (seconds): the fused path's launch variants, wall and GPU-only time
step sinkhorn "sinkhorn bench" 60 python3 bench/kernels.py --device cuda --only sinkhorn --sinkhorn-sweep \
  --out bench/results/kernels_sinkhorn_gpu.json
T_AIO=$(date +%s); wait $AIO_PID
echo "async_io build: $(tail -1 /tmp/aio_build.log) (waited $(( $(date +%s) - T_AIO ))s)" | tee -a "$LOG"
OFF_BUDGET="${OFFLOAD_BUDGET:-$(( $(left) - 40 ))}"
step offload "offload (GPU)" $(( OFF_BUDGET + 30 )) python3 bench/offload.py --device cuda --quick --merge \
  --budget-s "$OFF_BUDGET" ${OFFLOAD_ARMS:+--arms "$OFFLOAD_ARMS"}
# measured 2026-11-26 on an H100: zero3 + zero3_cpu_offload took ~115 s (rounds 2, steps 6); a zero3_nvme step
# moves ~5 GB through the disk (0.3B bf16 params + fp32 states), so it gets its own row with fewer steps
step overhead "trainer overhead (GPU)" "${TO_LIMIT:-150}" python3 bench/trainer_overhead.py --device cuda --model gpu_llama \
  --trainers "${TO_TRAINERS:-zero3_nvme}" --rounds "${TO_ROUNDS:-2}" --steps "${TO_STEPS:-4}" ${TO_ARGS:---phases}

echo; echo "summary ($(( $(date +%s) - T0 ))s total):" | tee -a "$LOG"
for r in "${RESULTS[@]}"; do echo "  $r" | tee -a "$LOG"; done
save
exit 0
