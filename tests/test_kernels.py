"""Property tests of the fused GWQ Triton kernels (``gwq_compile.codegen``).

Every case builds a random weight and outlier mask, packs it with
``packing.quantize_weight`` and compares the kernel with ``x @ W.T (+ b)`` computed in
fp64 from ``packing.dequantize_weight`` (the same codes, scales, zeros and outliers, so
the reference is exact).

Tolerance, elementwise and relative to the output's scale
``S = |x| @ |W|.T + |b|`` (the sum of the absolute values of the terms of each output):

    |y - ref| <= (ROUND[dtype] + (2 K + 4) * 2**-24) * S + 2**-24

``(2 K + 4) * 2**-24`` bounds fp32 accumulation of at most K products plus K outliers
and the bias; ``ROUND`` is 0 for fp32 and twice the unit roundoff for fp16/bf16 (the
weight tile is rounded to the activation dtype for ``tl.dot``, and the output is
rounded once); ``2**-24`` absorbs fp16 subnormal outputs.

On a machine without CUDA the kernels run on the Triton interpreter (CPU tensors): the
launcher loads an interpreted copy of the kernels by itself, so nothing here sets
``TRITON_INTERPRET`` (a subprocess test covers a process started with it).  The
interpreter has no bfloat16 (its ``tl.dot`` silently computes on the raw bits), so bf16
cases run on CUDA only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwq_compile import dispatch, packing
from gwq_compile.codegen import kernel_modules, launch
from gwq_compile.tensor import GWQTensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"
ACT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if not ON_CPU else [])
ROUND = {torch.float32: 0.0, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}

# Explicit tile configs per kernel family (None = the config the launcher chooses, the
# single candidate under the interpreter).  They cover: split-K 1/2/3 (direct store and
# atomic adds), the GEMV and the tl.dot form of the small-M kernel, several M blocks,
# K tiles that are and are not aligned with 32/64/128-groups, and dense programs that
# span one or several K tiles.
CONFIGS = {
    "gemv": [
        None,
        {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1},
        {"BLOCK_N": 64, "BLOCK_K": 16, "SPLIT_K": 3},
        {"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2},
        {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1},
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2},
    ],
    "dense": [
        None,
        {"BLOCK_N": 16, "BLOCK_K": 8, "K_TILES": 1},
        {"BLOCK_N": 8, "BLOCK_K": 32, "K_TILES": 3},
        {"BLOCK_N": 32, "BLOCK_K": 128, "K_TILES": 1},
        {"BLOCK_N": 4, "BLOCK_K": 16, "K_TILES": 4},
    ],
}
FAMILIES = list(CONFIGS)
# Hypothesis examples per property (fewer in a short GPU session, where every new example
# compiles kernels: benchmarks/gpu_session.sh sets 8).
MAX_EXAMPLES = int(os.environ.get("GWQ_HYPOTHESIS_EXAMPLES", "30"))
# Rows drawn per path: the small-M kernel is meant for 1..16 (17..20 checks several M
# blocks); the dense path takes any M, including the tiny ones.
M_RANGE = {"gemv": (1, 20), "dense": (1, 70)}


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    """Correctness, not speed: on CUDA the launcher would otherwise time every candidate
    config of each new random shape.  The candidates themselves are checked one by one
    (test_every_candidate_config) and tuning in tests/test_launch.py."""
    monkeypatch.setenv(launch.TUNE_ENV, "0")



def make_weight(
    n: int, k: int, bits: int, group_size: int, density: float, seed: int, empty_rows: bool = False, dense_col: bool = False
) -> packing.PackedWeight:
    """Random weight + random outlier mask (optionally rows without any and one column of outliers only)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = torch.rand(n, k, generator=gen) < density
    w = torch.where(mask, w * 8, w)  # outliers are the large weights
    if empty_rows:
        mask[:: max(1, n // 3)] = False
    if dense_col:
        mask[:, int(torch.randint(k, (1,), generator=gen))] = True
    p = packing.quantize_weight(w, mask, bits=bits, group_size=group_size)
    return packing.PackedWeight(*(t.to(DEVICE) for t in p[:6]), *p[6:])


def make_input(m: int, k: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """``x`` with ``m`` rows per leading index and the given memory layout (made on DEVICE
    first, so the view keeps its strides there)."""
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    if layout == "contiguous":
        return randn(m, k)
    if layout == "strided":  # every other element along K: stride_xk = 2, no copy
        return randn(m, 2 * k)[:, ::2]
    if layout == "transposed":  # stride_xm = 1
        return randn(k, m).T
    if layout == "3d":
        return randn(2, m, k)
    if layout == "3d-permuted":  # leading dims cannot be merged: the launcher's reshape copies
        return randn(m, 2, k).transpose(0, 1)
    raise ValueError(f"unknown layout {layout!r}")


def check_against_reference(y: torch.Tensor, x: torch.Tensor, p: packing.PackedWeight, bias: torch.Tensor | None) -> None:
    w = packing.dequantize_weight(p, torch.float64)
    ref = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    rtol = ROUND[x.dtype] + (2 * p.in_features + 4) * 2.0**-24
    err = (y.double() - ref).abs()
    bound = rtol * scale + 2.0**-24
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert bool((err <= bound).all()), f"error {float(err.max()):.3g} exceeds the bound by x{worst:.3g} (rtol={rtol:.3g})"


def run_kernel(x, p, bias, **kw) -> torch.Tensor:
    return launch.gwq_linear_triton(x, *p[:6], bias, p.bits, p.group_size, p.in_features, **kw)


# ----------------------------------------------------------------------------- properties


@st.composite
def problems(draw, path: str) -> dict:
    k = draw(st.integers(1, 300))
    group = draw(st.sampled_from([32, 64, 128, -1, "any"]))
    return dict(
        m=draw(st.integers(*M_RANGE[path])),
        n=draw(st.integers(1, 80)),
        k=k,
        bits=draw(st.sampled_from(packing.SUPPORTED_BITS)),
        group_size=draw(st.integers(1, k)) if group == "any" else group,
        density=draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])),
        empty_rows=draw(st.booleans()),
        dense_col=draw(st.booleans()),
        bias=draw(st.sampled_from(["none", "contiguous", "strided"])),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed", "3d", "3d-permuted"])),
        dtype=draw(st.sampled_from(ACT_DTYPES)),
        config=draw(st.sampled_from(CONFIGS[path])),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("path", FAMILIES)
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_kernel_matches_reference(path: str, data) -> None:
    """Random shapes, formats, outlier patterns, layouts, dtypes and tiles on each kernel family."""
    c = data.draw(problems(path))
    p = make_weight(c["n"], c["k"], c["bits"], c["group_size"], c["density"], c["seed"], c["empty_rows"], c["dense_col"])
    x = make_input(c["m"], c["k"], c["dtype"], c["layout"], c["seed"])
    bias = {
        "none": None,
        "contiguous": torch.randn(c["n"], device=DEVICE, dtype=c["dtype"]),
        "strided": torch.randn(2 * c["n"], device=DEVICE, dtype=c["dtype"])[::2],
    }[c["bias"]]
    y = run_kernel(x, p, bias, path=path, config=c["config"])
    check_against_reference(y, x, p, bias)


@pytest.mark.parametrize("path", FAMILIES)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48])
@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_every_format(bits: int, group_size: int, path: str) -> None:
    """Each bit width x group size (K=150: partial last group for all but per-channel) x path."""
    p = make_weight(24, 150, bits, group_size, density=0.05, seed=bits * 1000 + group_size)
    x = make_input(3 if path == "gemv" else 33, 150, torch.float16 if path == "dense" else torch.float32, "contiguous", seed=1)
    bias = torch.randn(24, device=DEVICE)
    check_against_reference(run_kernel(x, p, bias, path=path), x, p, bias)


def _candidates(family: str) -> list:
    module = {"gemv": "gemv", "dense": "dequant"}[family]
    return kernel_modules.kernel_modules(interpret=ON_CPU).__dict__[module].configs(interpreted=False)


@pytest.mark.parametrize(
    "family, index, m", [(f, i, m) for f in FAMILIES for i in range(len(_candidates(f))) for m in ((3, 16) if f == "gemv" else (20,))]
)
def test_every_candidate_config(family: str, index: int, m: int) -> None:
    """Each config the GPU tuner may pick (W4 g128, 3 % outliers, bias, fp16 x; K not a
    multiple of any tile; the GEMV in its broadcast and its tl.dot form), forced, against
    the reference."""
    cfg = _candidates(family)[index]
    knobs = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    p = make_weight(50, 300, 4, 128, density=0.03, seed=index)
    x = make_input(m, 300, torch.float16, "contiguous", seed=index)
    bias = torch.randn(50, device=DEVICE, dtype=torch.float16)
    check_against_reference(run_kernel(x, p, bias, path=family, config=knobs), x, p, bias)


@pytest.mark.parametrize("config", CONFIGS["dense"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48, 1])
@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_dense_weight_equals_dequantize_weight(bits: int, group_size: int, config) -> None:
    """The dense path's weight is bit-for-bit ``packing.dequantize_weight`` in fp32 (K=150:
    partial last group, partial last byte of every plane)."""
    p = make_weight(37, 150, bits, group_size, density=0.05, seed=bits * 7 + group_size, dense_col=True)
    w = launch.gwq_dequantize_triton(p, torch.float32, config=config)
    assert torch.equal(w, packing.dequantize_weight(p))
    assert torch.equal(launch.gwq_dequantize_triton(p, torch.float16, config=config), packing.dequantize_weight(p).half())


@pytest.mark.parametrize("bits", [3, 4])
def test_dense_program_writes_only_its_tile(bits: int) -> None:
    """One dense program (grid (1, 1)) writes exactly its ``BLOCK_N`` rows and its K span
    of ``BLOCK_K * K_TILES`` columns, outliers included, and nothing else: programs never
    race on another's cells, whatever order a GPU runs them in (the interpreter runs
    them one after another, so a full-grid result alone could not show that)."""
    p = make_weight(40, 150, bits, 32, density=0.2, seed=bits, dense_col=True)
    mod = kernel_modules.kernel_modules(interpret=ON_CPU).dequant
    cfg = dict(BLOCK_N=16, BLOCK_K=32, K_TILES=2)
    w = torch.full((40, 150), float("nan"), device=DEVICE)
    plane1 = packing.plane_offsets(150, bits)[1] if bits == 3 else 0
    mod.gwq_dequant_kernel[(1, 1)](
        *p[:6], w, 40, 150, plane1, p[0].stride(0), p[1].stride(0), p[2].stride(0), w.stride(0),
        BITS=bits, GROUP_SIZE=32, HAS_OUTLIERS=True, **cfg,
    )  # fmt: skip
    ref = packing.dequantize_weight(p)
    assert torch.equal(w[:16, :64].cpu(), ref[:16, :64].cpu())
    outside = torch.ones(40, 150, dtype=torch.bool)
    outside[:16, :64] = False
    assert bool(w.cpu()[outside].isnan().all()), "a program wrote outside its tile"


@pytest.mark.parametrize("path", FAMILIES)
@pytest.mark.parametrize(
    "pattern",
    [
        dict(density=0.0),
        dict(density=0.3),
        dict(density=0.0, dense_col=True),
        dict(density=0.1, empty_rows=True, dense_col=True),
    ],
    ids=["none", "30%", "one-dense-column", "empty-rows+dense-column"],
)
def test_outlier_patterns(pattern: dict, path: str) -> None:
    p = make_weight(50, 130, 3, 64, seed=7, **pattern)
    assert (p.outlier_values.numel() > 0) == (pattern["density"] > 0 or pattern.get("dense_col", False))
    x = make_input(5 if path == "gemv" else 40, 130, torch.float16, "contiguous", seed=2)
    check_against_reference(run_kernel(x, p, None, path=path), x, p, None)


@pytest.mark.parametrize("m", [1, 16, 17, 40])
def test_auto_dispatch(m: int, monkeypatch) -> None:
    """``path="auto"`` picks the GEMV up to SMALL_M_MAX rows and the dense path beyond, and both are right."""
    expected = "gemv" if m <= dispatch.SMALL_M_MAX else "dense"
    assert dispatch.triton_family(m) == expected
    seen = []
    original = dispatch.triton_family
    monkeypatch.setattr(dispatch, "triton_family", lambda rows, path="auto": seen.append(original(rows, path)) or seen[-1])
    p = make_weight(24, 70, 4, 32, density=0.05, seed=m)
    x = make_input(m, 70, torch.float32, "contiguous", seed=m)
    check_against_reference(run_kernel(x, p, None), x, p, None)
    assert seen == [expected]


def test_empty_input() -> None:
    p = make_weight(8, 40, 4, 32, density=0.1, seed=0)
    x = torch.empty(2, 0, 40, device=DEVICE)
    assert run_kernel(x, p, None).shape == (2, 0, 8)


@pytest.mark.skipif(ON_CPU, reason="the Triton interpreter (CPU) has no bfloat16: its tl.dot computes on the raw bits")
@pytest.mark.parametrize("path", FAMILIES)
def test_bfloat16(path: str) -> None:
    p = make_weight(64, 256, 4, 128, density=0.01, seed=3)
    x = make_input(4 if path == "gemv" else 64, 256, torch.bfloat16, "contiguous", seed=3)
    bias = torch.randn(64, device=DEVICE, dtype=torch.bfloat16)
    check_against_reference(run_kernel(x, p, bias, path=path), x, p, bias)


@pytest.mark.skipif(not ON_CPU, reason="CPU-only: bfloat16 refusal on the interpreter")
def test_bfloat16_on_interpreter_is_refused() -> None:
    p = make_weight(8, 40, 4, 32, density=0.0, seed=0)
    with pytest.raises(TypeError, match="bfloat16"):
        run_kernel(torch.randn(2, 40, dtype=torch.bfloat16), p, None)


# ----------------------------------------------------------------------------- dispatch through F.linear


def _gwq_weight(n: int = 48, k: int = 96, bits: int = 4, group_size: int = 32) -> GWQTensor:
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen)
    mask = torch.rand(n, k, generator=gen) < 0.01
    return GWQTensor.from_float(w, mask, bits=bits, group_size=group_size).to(DEVICE)


def test_gwq_kernel_env_switch(monkeypatch) -> None:
    """GWQ_KERNEL=reference and =triton give the same F.linear result, and triton really runs the kernel."""
    qw = _gwq_weight()
    x = torch.randn(2, 7, 96, device=DEVICE)
    bias = torch.randn(48, device=DEVICE)
    calls = []
    original = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda *a, **kw: calls.append(1) or original(*a, **kw))

    monkeypatch.setenv(dispatch.KERNEL_ENV, "reference")
    y_ref = F.linear(x, qw, bias)
    assert calls == []
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    y_tri = F.linear(x, qw, bias)
    assert calls == [1]
    check_against_reference(y_tri, x, qw.packed(), bias)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)


def test_bad_gwq_kernel_value_raises(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="GWQ_KERNEL"):
        F.linear(torch.randn(2, 96, device=DEVICE), _gwq_weight())


def test_gradient_through_triton_path(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    qw = _gwq_weight()
    x = torch.randn(3, 96, device=DEVICE, requires_grad=True)
    F.linear(x, qw).square().sum().backward()
    w = qw.dequantize(torch.float32)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ w.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_triton_op_eager_matches_launcher() -> None:
    """``torch.ops.gwq.linear_triton`` (the triton_op Inductor sees on CUDA) runs eagerly too."""
    p = make_weight(40, 100, 2, 64, density=0.05, seed=11)
    x = make_input(5, 100, torch.float32, "contiguous", seed=11)
    y = torch.ops.gwq.linear_triton(x, *p[:6], None, p.bits, p.group_size, p.in_features)
    torch.testing.assert_close(y, run_kernel(x, p, None), rtol=1e-5, atol=1e-5)
    check_against_reference(y, x, p, None)


def test_compiled_model_uses_kernel(monkeypatch) -> None:
    """torch.compile (Inductor) of a module with a GWQTensor weight, GWQ_KERNEL=triton: the
    compiled module runs the GWQ GEMV kernel at every call (on CPU the opaque op's body runs the
    launcher, counted in ``dispatch.CALLS``; on CUDA Inductor's generated code launches it)."""
    monkeypatch.setenv(dispatch.KERNEL_ENV, "triton")
    torch._dynamo.reset()
    lin = torch.nn.Linear(96, 48, bias=True).to(DEVICE)
    lin.weight = torch.nn.Parameter(_gwq_weight(), requires_grad=False)
    x = torch.randn(4, 96, device=DEVICE)
    with torch.no_grad():
        compiled = torch.compile(lin)
        if ON_CPU:
            y = compiled(x)  # compiles, then runs once
            before = dict(dispatch.CALLS)
            compiled(x)
            compiled(x)
            ran = {k: v - before.get(k, 0) for k, v in dispatch.CALLS.items() if v != before.get(k, 0)}
            assert ran == {"triton_gemv": 2}
        else:
            from torch._inductor.utils import run_and_get_code  # noqa: PLC0415

            y, code = run_and_get_code(compiled, x)
            assert any("gwq_gemv_kernel" in c for c in code)
    check_against_reference(y, x, lin.weight.packed(), lin.bias.detach())


# ----------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("codes_dtype", TypeError, "packed_codes"),
        ("scales_shape", ValueError, "group_scales"),
        ("x_features", ValueError, "in_features"),
        ("x_int", TypeError, "x must be"),
        ("bias_shape", ValueError, "bias"),
        ("path", ValueError, "path"),
        ("config_key", ValueError, "BLOCK_Q"),
        ("config_dense_knob", ValueError, "SPLIT_K"),
        ("config_dot_too_small", ValueError, "tl.dot"),
        ("config_block_k_too_small", ValueError, "BLOCK_K must be >= 8"),
        ("config_not_pow2", ValueError, "power of two"),
    ],
)
def test_bad_arguments_name_the_argument(case: str, error: type, match: str) -> None:
    p = make_weight(16, 64, 4, 32, density=0.05, seed=0)
    args = [torch.randn(2, 64, device=DEVICE), *p[:6], None, p.bits, p.group_size, p.in_features]
    kw = {}
    if case == "codes_dtype":
        args[1] = args[1].to(torch.int32)
    elif case == "scales_shape":
        args[2] = args[2][:, :1]
    elif case == "x_features":
        args[0] = torch.randn(2, 63, device=DEVICE)
    elif case == "x_int":
        args[0] = torch.ones(2, 64, dtype=torch.int32, device=DEVICE)
    elif case == "bias_shape":
        args[7] = torch.zeros(15, device=DEVICE)
    elif case == "path":
        kw["path"] = "gemm"  # the deleted fused GEMM
    elif case == "config_key":
        kw.update(path="gemv", config={"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_Q": 1})
    elif case == "config_dense_knob":
        kw.update(path="dense", config={"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2})
    elif case == "config_dot_too_small":
        kw.update(path="gemv", config={"BLOCK_M": 16, "BLOCK_N": 8, "BLOCK_K": 16})
    elif case == "config_block_k_too_small":
        kw.update(path="dense", config={"BLOCK_N": 16, "BLOCK_K": 4})
    elif case == "config_not_pow2":
        kw.update(path="gemv", config={"BLOCK_N": 24, "BLOCK_K": 16, "SPLIT_K": 1})
    with pytest.raises(error, match=match):
        launch.gwq_linear_triton(*args, **kw)


# ----------------------------------------------------------------------------- config spaces


@pytest.mark.parametrize("block_m", [1, 4, 8, 16])
@pytest.mark.parametrize("n, k, group_size", [(4096, 4096, 128), (11008, 4096, 64), (4096, 11008, 48), (10, 20, 20)])
def test_gemv_pruner(block_m: int, n: int, k: int, group_size: int) -> None:
    gemv = kernel_modules.kernel_modules(interpret=ON_CPU).gemv
    configs = gemv.configs(interpreted=False)
    kept = gemv.prune(configs, n, k, block_m, group_size)
    assert kept and all(c in configs for c in kept)
    if any(group_size % c.kwargs["BLOCK_K"] == 0 for c in kept):
        assert all(group_size % c.kwargs["BLOCK_K"] == 0 for c in kept)
    if len(kept) > 1:
        assert all(gemv.fits_registers(block_m, c) for c in kept)


@pytest.mark.parametrize("block_m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)])
def test_gemv_default_is_one_launch_that_fills_the_gpu(block_m: int, n: int, k: int) -> None:
    """The untuned GEMV config on a GPU (what a traced decode step gets when no eager call
    tuned it) stores directly (no split-K memset/cast) with >= 256 programs (2 per SM)."""
    gemv = kernel_modules.kernel_modules(interpret=ON_CPU).gemv
    cfg = gemv.default_config(n, k, block_m, 128, interpreted=False)
    assert cfg.kwargs["SPLIT_K"] == 1
    assert -(-n // cfg.kwargs["BLOCK_N"]) >= 256
    assert cfg in gemv.prune(gemv.configs(interpreted=False), n, k, block_m, 128)


def test_interpreter_uses_one_config() -> None:
    mods = kernel_modules.kernel_modules(interpret=True)
    assert mods.gemv.INTERPRETED and mods.dequant.INTERPRETED and mods.unpack.INTERPRETED
    assert len(mods.gemv.configs()) == 1 and len(mods.dequant.configs()) == 1
    assert len(mods.gemv.configs(interpreted=False)) > 1 and len(mods.dequant.configs(interpreted=False)) > 1


# ----------------------------------------------------------------------------- imports


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_is_light() -> None:
    """Importing the package and ``codegen`` neither loads the kernels nor touches a GPU."""
    code = (
        "import sys, torch\n"
        "import gwq_compile, gwq_compile.codegen, gwq_compile.codegen.launch\n"
        "loaders = ('gwq_compile.codegen.launch', 'gwq_compile.codegen.kernel_modules')\n"
        "assert not [m for m in sys.modules if m.startswith('gwq_compile.codegen.') and m not in loaders]\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_missing_triton_gives_clear_error_only_when_used() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import os, torch\n"
        "import gwq_compile, gwq_compile.codegen.launch as L\n"
        "from gwq_compile import packing\n"
        "p = packing.quantize_weight(torch.randn(8, 40), None, bits=4, group_size=32)\n"
        "y = torch.ops.gwq.linear(torch.randn(2, 40), *p[:6], None, 4, 32, 40)\n"  # reference still works
        "os.environ['GWQ_KERNEL'] = 'triton'\n"
        "try:\n"
        "    torch.ops.gwq.linear(torch.randn(2, 40), *p[:6], None, 4, 32, 40)\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ImportError:" in proc.stdout and "`triton` package" in proc.stdout and "GWQ_KERNEL=reference" in proc.stdout


def test_cpu_kernels_leave_triton_mode_alone() -> None:
    """Running on CPU neither needs nor leaks TRITON_INTERPRET: kernels decorated later by
    anyone else keep the mode triton was imported in."""
    import triton

    before = os.environ.get("TRITON_INTERPRET")
    p = make_weight(8, 40, 4, 32, density=0.1, seed=0)
    p = packing.PackedWeight(*(t.cpu() for t in p[:6]), *p[6:])
    x = torch.randn(2, 40)
    check_against_reference(run_kernel(x, p, None), x, p, None)
    assert os.environ.get("TRITON_INTERPRET") == before

    @triton.jit
    def _probe(x_ptr):
        pass

    assert (not isinstance(_probe, triton.runtime.jit.JITFunction)) == kernel_modules.triton_interpreting()


def test_process_started_with_triton_interpret() -> None:
    """With TRITON_INTERPRET=1 before triton's import, the regular kernels module is the interpreted one."""
    code = (
        "import torch\n"
        "from gwq_compile import packing\n"
        "from gwq_compile.codegen import kernel_modules, launch\n"
        "assert kernel_modules.triton_interpreting()\n"
        "w = torch.randn(20, 70); mask = torch.rand_like(w) < 0.05\n"
        "p = packing.quantize_weight(w, mask, bits=3, group_size=32)\n"
        "ref = packing.dequantize_weight(p)\n"
        "for m in (2, 20):\n"
        "    x = torch.randn(m, 70)\n"
        "    y = launch.gwq_linear_triton(x, *p[:6], None, 3, 32, 70)\n"
        "    torch.testing.assert_close(y, x @ ref.T, rtol=1e-5, atol=1e-5)\n"
        "import sys\n"
        "assert kernel_modules.kernel_modules(True).gemv is sys.modules['gwq_compile.codegen.gemv']\n"
        "print('ok')\n"
    )
    proc = _python(code, TRITON_INTERPRET="1")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
