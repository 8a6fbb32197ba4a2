#!/usr/bin/env bash
# The test command (README, .ci/run): install runx with its test extras and system deps, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# DeepSpeed's async_io op (ZeRO-Infinity NVMe offload) needs libaio's headers.
if ! dpkg -s libaio-dev >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq libaio-dev) >/dev/null 2>&1 || echo "warning: could not install libaio-dev"
fi
python -m pip install -q --disable-pip-version-check ".[test]" 2>&1 | grep -v "Running pip as the 'root' user" || true

export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# JIT-build async_io once per machine (cached in ~/.cache/torch_extensions) while the other tests run;
# the NVMe tests (tests/test_z_nvme.py, collected last) wait for it.
mkdir -p .pytest_cache
python -m runx.trainers.nvme --build-aio > .pytest_cache/aio_build.log 2>&1 &
echo $! > .pytest_cache/aio_build.pid

set +e
python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup "$@" tests
rc=$?
set -e
wait "$(cat .pytest_cache/aio_build.pid)" 2>/dev/null || true
if [ "$rc" -eq 5 ]; then echo "pytest selected no tests: failing"; exit 1; fi
exit "$rc"
