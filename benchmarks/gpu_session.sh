#!/usr/bin/env bash
# One lent-GPU session's work in one call: environment, CUDA correctness, then speed.
#
#   bash benchmarks/gpu_session.sh [STAGE] [OUT_DIR]      (defaults: all, $OUT or benchmarks/results)
#
# STAGE is one of (each with its own time limit, so a failure or a hang in one stage
# cannot eat the others; on an H100/H200 "all" takes about 8 minutes at most):
#   check    <= 120 s  versions, then focused CUDA tests with GWQ_KERNEL=triton
#                      (tests/test_kernels.py + tests/test_launch.py; 8 hypothesis examples per
#                      property: each new example compiles kernels, which is what costs on a GPU)
#   kernels  <= 170 s  benchmarks/kernels.py: 4096x11008 (the M = 1 target, first, so a
#                      cut-short run still has it), 4096x4096, 11008x4096 at M = 1, 16, 256, 2048 for
#                      W4 and W3 (group 128, 1 % outliers), cuBLAS fp16 and torchao int4 in the same
#                      run; GWQ configs are tuned once per shape by the first (checked, untimed) call
#   decode   <= 200 s  benchmarks/decode.py: Llama-2-7B-shaped (32 layers), batch 1, fp16 vs gwq4,
#                      torch.compile mode reduce-overhead, 64 timed tokens, TORCH_LOGS=perf_hints
#                      (stderr in decode.log: "skipping cudagraphs due to ..." names any graph not
#                      run as a CUDA graph; the result rows count them as cudagraph_skips)
#   all      the three in order (~8 min), then OUT_DIR/summary.txt
#
# Every result and log goes to OUT_DIR: env.txt, check_tests.log, kernels_<gpu>.md/.json,
# kernels.log, decode_<gpu>_reduce-overhead.md/.json, decode.log, summary.txt.  The benchmarks
# rewrite their result files as they go, so a stage cut short by its limit keeps what it measured.
#
# On the device machine (no package index) torchao travels as a wheel in .whl/
# (see /work/.library/device/README.md); it is installed into /tmp/site first.
set -u -o pipefail
stage=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
case "$stage" in check | kernels | decode | all) ;; *) echo "unknown stage $stage (check, kernels, decode or all)" >&2; exit 2 ;; esac
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

# run_stage NAME LIMIT_S COMMAND...: COMMAND under `timeout`, its rc and duration in summary.txt.
run_stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    timeout -k 10 "$limit" "$@"
    rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (hit its ${limit} s limit)"
    echo "$name: rc=$rc in $((SECONDS - t0)) s$note" | tee -a "$out/summary.txt"
    return 0
}

run_check() {
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
        python3 -c "import torch, triton, torchao, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    } 2>&1 | tee "$out/env.txt"
    GWQ_KERNEL=triton GWQ_HYPOTHESIS_EXAMPLES=8 run_stage check 120 \
        bash -c "set -o pipefail; python3 -m pytest -q --maxfail=5 -p no:cacheprovider --durations=10 tests/test_launch.py tests/test_kernels.py \
            -k 'test_launch or candidate or matches_reference or (every_format and 128) or (dense_weight_equals and 128 and config2) or outlier_patterns \
                or bfloat16 or auto_dispatch or triton_op or compiled_model or env_switch or gradient' 2>&1 | tee '$out/check_tests.log'"
}
run_kernels() {
    run_stage kernels 170 bash -c "set -o pipefail; python3 benchmarks/kernels.py --out-dir '$out' \
        --shapes 4096x11008 4096x4096 11008x4096 --m 1 16 256 2048 --bits 4 3 2>&1 | tee '$out/kernels.log'"
}
run_decode() {
    TORCH_LOGS=perf_hints run_stage decode 200 bash -c "set -o pipefail; python3 benchmarks/decode.py --out-dir '$out' --variants fp16 gwq4 \
        --compile-mode reduce-overhead --new-tokens 64 --warmup-tokens 4 2>&1 | tee '$out/decode.log'"
    local skips
    skips=$(grep -c 'skipping cudagraphs' "$out/decode.log" 2>/dev/null || true)
    echo "decode: ${skips:-0} 'skipping cudagraphs' lines in decode.log" | tee -a "$out/summary.txt"
}
case "$stage" in
    check) run_check ;;
    kernels) run_kernels ;;
    decode) run_decode ;;
    all) run_check; run_kernels; run_decode ;;
esac
