#!/usr/bin/env bash
# One pass over a CUDA machine for the streaming / loading work: the gpu-marked tests of the
# upload, staging, offload and LoRA paths, then the load-bandwidth benchmark (load_model from
# the page cache against pinned and pageable copies, the staging settings in a round robin, first
# loads in fresh processes). Everything is logged under OUT.
#
#   bash benchmarks/gpu_checks.sh OUT [--quick]
#
# --quick skips the first-load processes and the settings sweep (about a third of the time).
# Run from the repository root with the package importable (pip install -e . or PYTHONPATH=src).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT [--quick]}
quick=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

tests=(tests/test_upload.py tests/test_staging.py tests/test_offload.py
       tests/test_offload_pipeline.py tests/test_model.py tests/test_lora_apply.py
       tests/test_lora_dora.py tests/test_lora_lycoris.py)
python -m pytest -q -m gpu -x -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# /dev/shm keeps the file in memory whatever the disk; the benchmark reads it as a page-cache file.
load_args=(--load --load-gib 8 --tmp /dev/shm --out "$out")
if [ "$quick" = "--quick" ]; then
    load_args+=(--no-first-load --no-load-sweep)
fi
python benchmarks/gpu_offload.py "${load_args[@]}" 2>&1 | tee "$out/gpu_load.log"
load_rc=${PIPESTATUS[0]}

echo "gpu_checks: tests rc=$tests_rc, load benchmark rc=$load_rc"
[ "$tests_rc" -eq 0 ] && [ "$load_rc" -eq 0 ]
