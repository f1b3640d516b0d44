#!/usr/bin/env bash
# One lent-GPU session's work in one call: environment, CUDA correctness, then speed.
#
#   bash benchmarks/gpu_session.sh STAGE [OUT_DIR]
#
# STAGE is one of
#   check    versions + the kernel/tensor/backend tests on CUDA with GWQ_KERNEL=triton
#   kernels  benchmarks/kernels.py (full Llama-2-7B grid), results into OUT_DIR
#   decode   benchmarks/decode.py, results into OUT_DIR
#   all      the three in order
#
# On the device machine (no package index) torchao travels as a wheel in .whl/
# (see /work/.library/device/README.md); it is installed into /tmp/site first.
set -u -o pipefail
stage=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Install the package itself (editable: passes/ and codegen/ are mapped to
# gwq_compile.passes / gwq_compile.codegen by pyproject's package-dir), no deps, no index.
python3 -c "import gwq_compile.passes" 2>/dev/null ||
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1

run_check() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$out/env.txt"
    python3 -c "import torch, triton, torchao, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$out/env.txt"
    GWQ_KERNEL=triton timeout 420 python3 -m pytest -q -x -p no:cacheprovider --durations=10 \
        tests/test_kernels.py tests/test_tensor.py 2>&1 | tee "$out/check_tests.log"
}
run_kernels() {
    timeout 560 python3 benchmarks/kernels.py --out-dir "$out" 2>&1 | tee "$out/kernels.log"
}
run_decode() {
    timeout 560 python3 benchmarks/decode.py --out-dir "$out" 2>&1 | tee "$out/decode.log"
}
case "$stage" in
    check) run_check ;;
    kernels) run_kernels ;;
    decode) run_decode ;;
    all) run_check; run_kernels; run_decode ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
