"""The CPU runtime layout (``gwq_compile.cpu_layout``) and the fast path that uses it.

Every case packs a random weight with ``packing.quantize_weight`` and compares the CPU
fast path with ``x @ W.T (+ b)`` in fp64 from ``packing.dequantize_weight`` (the same
codes, scales, zeros and outliers).

Tolerance.  The fast path rounds the activations to bf16 (unit roundoff u = 2**-8), reads a
bf16 copy of the grid (each tile's scale, and its zero, which is at most ``c_b`` scales in
size: 16 for 2-4-bit codes, 272 for 8-bit ones, whose high nibble carries 16 scales) and
returns its product in bf16; the outliers and the bias are added in fp32 (then rounded
once to x's dtype).  Each product ``x_k w_k`` is therefore off by at most
``u |x_k| |w_k| + u |x_k| (|w_k| + c_b s_k)`` and the sum by ``u |y|`` more, so

    |y - ref| <= 4 u T + 2**-24,   T = |x| @ (|W| + c_b S).T + |b|

with ``S`` the group scale of each weight (one more ``u T`` for rounding bf16/fp16 outputs).
The AVX2 decode GEMV rounds x to int16 per tile group instead (``csrc/cpu_gemv_avx2.h``):
each entry off by at most ``2**-16 max|x_group|``, and with ``|w| <= 15 s`` (``255 s`` for
8-bit codes) a group's error stays more than 10x inside the same bound.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gwq_compile import GWQConfig, GWQTensor, cpu_kernel, cpu_layout, dispatch, load_quantized, packing, quantize_, save_quantized
from gwq_compile.grid import dequantize_codes
from tests.conftest import tiny_llama

U = 2.0**-8


def make_weight(n: int, k: int, bits: int, group_size: int, density: float, seed: int, empty_rows: bool = False, dense_col: bool = False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = torch.rand(n, k, generator=gen) < density
    w = torch.where(mask, w * 8, w)  # outliers are the large weights
    if empty_rows:
        mask[:: max(1, n // 3)] = False
    if dense_col:
        mask[:, int(torch.randint(k, (1,), generator=gen))] = True
    return packing.quantize_weight(w, mask, bits=bits, group_size=group_size)


def check_close(y: torch.Tensor, x: torch.Tensor, p: packing.PackedWeight, bias: torch.Tensor | None) -> None:
    """The bound of the module docstring, elementwise."""
    w = packing.dequantize_weight(p, torch.float64)
    ref = x.double() @ w.T
    scales = dequantize_codes(
        torch.ones(w.shape, dtype=torch.uint8), p.group_scales, torch.zeros_like(p.group_zeros), p.group_size, torch.float64
    )
    c_b = 272 if p.bits == 8 else 16
    t = x.double().abs() @ (w.abs() + c_b * scales).T
    if bias is not None:
        ref, t = ref + bias.double(), t + bias.double().abs()
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.double() - ref).abs()
    bound = 4 * U * t + 2.0**-24
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert bool((err <= bound).all()), f"error {float(err.max()):.3g} exceeds the bound by x{worst:.3g}"


KERNELS = {"ext": "cpu", "aten": "cpu_aten"}  # the fast path's two implementations, by GWQ_KERNEL value


@contextlib.contextmanager
def kernel_env(kernel: str):
    old = os.environ.get(dispatch.KERNEL_ENV)
    os.environ[dispatch.KERNEL_ENV] = KERNELS[kernel]
    try:
        yield
    finally:
        if old is None:
            del os.environ[dispatch.KERNEL_ENV]
        else:
            os.environ[dispatch.KERNEL_ENV] = old


def fast_linear(x, p, bias, kernel: str = "ext", codes_grid=None):
    """The CPU fast path on ``p`` with the given kernel, which must be the one that ran."""
    codes, grid = codes_grid or cpu_layout.pack(p)
    before = dispatch.CALLS[f"cpu_int4_{kernel}"]
    with kernel_env(kernel):
        y = cpu_layout.linear(x, codes, grid, *p[3:6], bias, p.bits, p.group_size, p.in_features)
    assert dispatch.CALLS[f"cpu_int4_{kernel}"] == before + 1
    return y


# ----------------------------------------------------------------------------- the layout


@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48, 16, 1])
@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("n", [1, 64, 130])
def test_layout_round_trip_is_exact(bits: int, group_size: int, n: int) -> None:
    """Stored codes -> int4 operand -> stored codes, bit for bit (K=150: partial last group);
    and the row gather of embedding lookups."""
    p = make_weight(n, 150, bits, group_size, density=0.05, seed=bits + group_size + n)
    codes, grid = cpu_layout.pack(p)
    assert codes.shape[0] % cpu_layout.BLOCK_N == 0 and grid.dtype == torch.bfloat16
    assert torch.equal(cpu_layout.unpack_codes(codes, bits, p.group_size, 150, n), p.packed_codes)
    rows = torch.tensor([n - 1, 0, n // 2, n - 1])
    want = packing.unpack_codes(p.packed_codes, bits, 150)[rows]
    assert torch.equal(cpu_layout.unpack_rows(codes, bits, p.group_size, 150, rows), want)


@st.composite
def problems(draw) -> dict:
    k = draw(st.integers(1, 300))
    group = draw(st.sampled_from([32, 64, 128, -1, "any"]))
    return dict(
        m=draw(st.integers(1, 70)),
        n=draw(st.integers(1, 150)),
        k=k,
        bits=draw(st.sampled_from(packing.SUPPORTED_BITS)),
        group_size=draw(st.integers(1, k)) if group == "any" else group,
        density=draw(st.sampled_from([0.0, 0.01, 0.1, 0.3])),
        empty_rows=draw(st.booleans()),
        dense_col=draw(st.booleans()),
        bias=draw(st.booleans()),
        three_d=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        kernel=draw(st.sampled_from(sorted(KERNELS))),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=problems())
def test_fast_path_matches_reference(c: dict) -> None:
    """Random M, N, K (K not a multiple of the group), bits, group sizes, outlier densities
    (rows without any, one dense column), dtypes, 3-D inputs and bias."""
    p = make_weight(c["n"], c["k"], c["bits"], c["group_size"], c["density"], c["seed"], c["empty_rows"], c["dense_col"])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    shape = (2, c["m"], c["k"]) if c["three_d"] else (c["m"], c["k"])
    x = torch.randn(*shape, generator=gen).to(c["dtype"])
    bias = torch.randn(c["n"], generator=gen).to(c["dtype"]) if c["bias"] else None
    check_close(fast_linear(x, p, bias, c["kernel"]), x, p, bias)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("m", [1, 3, 40])
@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48])
def test_every_format(bits: int, group_size: int, m: int, kernel: str) -> None:
    p = make_weight(70, 150, bits, group_size, density=0.05, seed=bits * 100 + group_size, dense_col=True)
    x = torch.randn(m, 150)
    bias = torch.randn(70)
    check_close(fast_linear(x, p, bias, kernel), x, p, bias)


needs_gemv = pytest.mark.skipif(not cpu_kernel.gemv_supported(), reason="this CPU has neither AVX512-BF16 nor AVX2: decode uses torch's int4 GEMM")


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo to know the CPU's features")
def test_the_gemv_for_this_cpu_is_the_one_that_runs() -> None:
    """The bf16 GEMV where the CPU has AVX512-BF16, the fp32 one on other AVX2 CPUs: a CPU
    class must never silently lose its decode GEMV to torch's int4 GEMM."""
    flags = cpu_flags()
    expected = "avx512_bf16" if {"avx512f", "avx512bw", "avx512_bf16", "f16c"} <= flags else "avx2" if {"avx2", "fma", "f16c"} <= flags else ""
    assert cpu_kernel.gemv_isa() == expected
    if expected:  # and a decode row takes it
        p = make_weight(70, 150, 4, 64, density=0.05, seed=0)
        x = torch.randn(1, 150)
        check_close(kernel_path_linear(x, p, None, 1, "gemv"), x, p, None)


def kernel_path_linear(x, p, bias, gemv_max_rows: int, path: str):
    """The compiled kernel on ``p`` with the given GEMV row limit; ``path`` must be the one that ran."""
    codes, grid = cpu_layout.pack(p)
    km = cpu_layout.k_map(p.in_features, p.group_size, p.bits)
    with ran_only(path):
        return torch.ops.gwq_cpu.linear.default(
            x, codes, grid, *p[3:6], bias, km.tile_group, p.in_features, km.pad, km.gather, p.bits == 8, cpu_layout.TILE_MIN_ROWS, gemv_max_rows
        )


@contextlib.contextmanager
def ran_only(path: str):
    """The compiled kernel ran exactly once within, on ``path`` (``cpu_kernel.PATHS``)."""
    before = cpu_kernel.path_calls()
    yield
    after = cpu_kernel.path_calls()
    assert {k: after[k] - before[k] for k in after} == {k: int(k == path) for k in after}, f"expected the {path} path"


@needs_gemv
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=problems())
def test_decode_gemv_matches_reference(c: dict) -> None:
    """This CPU's GEMV (csrc/cpu_gemv_bf16.h or csrc/cpu_gemv_avx2.h) on 1-4 rows of x, over the same random
    formats, outlier layouts and dtypes as the rest of the fast path."""
    p = make_weight(c["n"], c["k"], c["bits"], c["group_size"], c["density"], c["seed"], c["empty_rows"], c["dense_col"])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    m = 1 + c["m"] % 4
    shape = (1, m, c["k"]) if c["three_d"] else (m, c["k"])
    x = torch.randn(*shape, generator=gen).to(c["dtype"])
    bias = torch.randn(c["n"], generator=gen).to(c["dtype"]) if c["bias"] else None
    check_close(kernel_path_linear(x, p, bias, 4, "gemv"), x, p, bias)


@needs_gemv
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("bits,group_size,k", [(4, 64, 576), (8, 128, 576), (3, 32, 33), (2, -1, 200), (4, 48, 150)])
def test_decode_gemv_edge_shapes(bits: int, group_size: int, k: int, n: int) -> None:
    """Partial 64-row blocks, one row, 8-bit codes (two nibbles), padded and gathered groups."""
    p = make_weight(n, k, bits, group_size, density=0.02, seed=n + k + bits, dense_col=True)
    x = torch.randn(1, k)
    bias = torch.randn(n)
    check_close(kernel_path_linear(x, p, bias, 1, "gemv"), x, p, bias)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=problems())
def test_the_kernels_int4_path_matches_reference(c: dict) -> None:
    """The compiled kernel's torch-int4-GEMM path (M < 32 where the GEMV does not take it: on
    AVX2 the GEMV takes every such M, so it is forced here with a GEMV limit of 0)."""
    p = make_weight(c["n"], c["k"], c["bits"], c["group_size"], c["density"], c["seed"], c["empty_rows"], c["dense_col"])
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    m = 1 + c["m"] % (cpu_layout.TILE_MIN_ROWS - 1)
    x = torch.randn(m, c["k"], generator=gen).to(c["dtype"])
    bias = torch.randn(c["n"], generator=gen).to(c["dtype"]) if c["bias"] else None
    check_close(kernel_path_linear(x, p, bias, 0, "int4"), x, p, bias)


@pytest.mark.parametrize("m,path", [(1, "gemv"), (3, "int4"), (31, "int4"), (40, "tile")])
def test_the_fast_path_takes_the_kernel_path_its_rows_ask_for(m: int, path: str) -> None:
    """cpu_layout.linear: decode rows on the GEMV (where the CPU has it: up to 2 rows on
    AVX512-BF16, every M below the tiles on AVX2), other small M on torch's int4 GEMM,
    prefill on dequantized tiles."""
    if path == "gemv" and not cpu_kernel.gemv_supported():
        path = "int4"
    if path == "int4" and m <= cpu_layout.gemv_max_rows():
        path = "gemv"
    p = make_weight(70, 150, 4, 64, density=0.05, seed=m)
    x = torch.randn(m, 150)
    with ran_only(path):
        y = fast_linear(x, p, None)
    check_close(y, x, p, None)


def test_the_compiled_kernel_is_built_here() -> None:
    """CI machines have g++ and ninja: the fast path must not quietly use its ATen version there."""
    assert cpu_kernel.reason_unavailable() is None
    assert dispatch.cpu_kernel() == "ext"


# 1 row: the decode GEMV (ext); 4 rows: torch's int4 GEMM; 40 rows: the compiled kernel's
# dequantized-tile path (M >= 32).
@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_check_rejects_a_broken_grid(kernel: str, m: int) -> None:
    """The tolerance is tight enough to see a grid off by one code step in one group."""
    p = make_weight(64, 128, 4, 64, density=0.0, seed=3)
    codes, grid = cpu_layout.pack(p)
    broken = grid.clone()
    broken[0, 5, 1] += broken[0, 5, 0]  # tile group 0 of row 5: every weight one step higher
    x = torch.rand(m, 128) + 0.5
    y = fast_linear(x, p, None, kernel, codes_grid=(codes, broken))
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_close(y, x, p, None)


@pytest.mark.parametrize("m", [1, 4, 40])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_check_rejects_a_dropped_outlier(kernel: str, m: int) -> None:
    p = make_weight(64, 128, 4, 64, density=0.02, seed=4)
    j = int(p.outlier_row_ptr[10])  # an outlier of row 10, left out of the product below
    x = torch.full((m, 128), 1e-3)
    x[:, int(p.outlier_col_idx[j])] = 1.0  # its column carries the signal
    check_close(fast_linear(x, p, None, kernel), x, p, None)
    dropped = p._replace(outlier_values=p.outlier_values.clone().index_fill_(0, torch.tensor([j]), 0.0))
    with pytest.raises(AssertionError, match="exceeds the bound"):
        check_close(fast_linear(x, dropped, None, kernel), x, p, None)


# ----------------------------------------------------------------------------- through GWQTensor


def _qlinear(bits=4, group_size=64, n=96, k=160, density=0.02, bias=True):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    mask = torch.rand(n, k) < density
    lin.weight = torch.nn.Parameter(GWQTensor.from_float(lin.weight.detach(), mask, bits, group_size), requires_grad=False)
    return lin


def test_cpu_weights_take_the_fast_path_and_it_is_counted(monkeypatch) -> None:
    lin = _qlinear()
    assert lin.weight.code_layout == "cpu_int4" and lin.weight.packed_codes is None
    x = torch.randn(3, 160)
    before = dispatch.CALLS["cpu_int4"]
    y = lin(x)
    assert dispatch.CALLS["cpu_int4"] == before + 1
    check_close(y, x, lin.weight.packed(), lin.bias.detach())
    monkeypatch.setenv(dispatch.KERNEL_ENV, "reference")
    y_ref = lin(x)
    assert dispatch.CALLS["cpu_int4"] == before + 1  # the reference did not run the fast path
    torch.testing.assert_close(y_ref, x @ lin.weight.dequantize().T + lin.bias, rtol=1e-5, atol=1e-5)


def test_the_cached_eager_call_is_never_saved_and_is_rebuilt() -> None:
    """dispatch.eager_kernel_args caches the kernel call on the weight: a checkpoint must not
    carry it, and a loaded weight builds its own and gives the same output."""
    lin = _qlinear()
    x = torch.randn(1, 160)
    with torch.no_grad():
        y = lin(x)
    assert dispatch.EAGER_ARGS_ATTR in lin.weight.__dict__
    buffer = io.BytesIO()
    torch.save({"weight": lin.weight}, buffer)  # the object itself (a state_dict holds detached copies)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight"]
    assert dispatch.EAGER_ARGS_ATTR not in loaded.__dict__
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, loaded, lin.bias), y, rtol=0, atol=0)
    assert dispatch.EAGER_ARGS_ATTR in loaded.__dict__


def _kernel_events(fn) -> dict[str, int]:
    with torch.profiler.profile() as prof:
        fn()
    names = ("gwq_cpu::linear", "gwq::linear_cpu", "gwq::linear")
    return {n: sum(e.name == n for e in prof.events()) for n in names}


@pytest.mark.parametrize("group_size", [32, 48])
def test_compiled_module_runs_the_fast_path(group_size: int) -> None:
    """Compiled graphs call the compiled kernel directly (group sizes that need no gather),
    or the registered op around it; either way the same numbers as eager."""
    torch._dynamo.reset()
    lin = _qlinear(bits=3, group_size=group_size)
    x = torch.randn(2, 5, 160)
    compiled = torch.compile(lin, fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
        events = _kernel_events(lambda: compiled(x))
    assert events["gwq_cpu::linear"] == 1
    assert events["gwq::linear_cpu"] == (0 if group_size == 32 else 1)
    torch.testing.assert_close(y, lin(x), rtol=0, atol=0)


def test_a_compiled_graph_follows_gwq_kernel(monkeypatch) -> None:
    """A graph compiled under another GWQ_KERNEL is not reused (the AOT cache key includes it)."""
    lin = _qlinear()
    x = torch.randn(3, 160)
    with torch.no_grad():
        torch._dynamo.reset()
        fast = torch.compile(lin)(x)
        monkeypatch.setenv(dispatch.KERNEL_ENV, "reference")
        torch._dynamo.reset()
        reference = torch.compile(lin)(x)
    exact = x @ lin.weight.dequantize().T + lin.bias
    torch.testing.assert_close(reference, exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, reference)  # the bf16 fast path differs in the last bits


def test_gwq_kernel_cpu_refuses_a_weight_without_the_cpu_layout(monkeypatch) -> None:
    lin = _qlinear()
    lin.weight = torch.nn.Parameter(lin.weight.to_layout("planes"), requires_grad=False)
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cpu")
    with pytest.raises(ValueError, match="GWQ_KERNEL=cpu"):
        lin(torch.randn(1, 160))


def test_layouts_hold_the_same_weight() -> None:
    lin = _qlinear(bits=8, group_size=-1)
    planes = lin.weight.to_layout("planes")
    assert planes.code_layout == "planes" and planes.cpu_int4_codes is None
    assert torch.equal(planes.dequantize(), lin.weight.dequantize())
    for a, b in zip(planes.packed(), lin.weight.packed()):
        assert a == b if isinstance(a, int) else torch.equal(a, b)


def test_resident_bytes_of_w4_are_close_to_the_stored_size() -> None:
    """W4 g64 + 0.5 %: the CPU layout holds <= 1.25x the stored bytes (SmolLM2's shapes)."""
    torch.manual_seed(0)
    for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        w = GWQTensor.from_float(torch.randn(n, k), torch.rand(n, k) < 0.005, 4, 64)
        stored = sum(w.storage_bits().values()) / 8
        assert stored < w.resident_bytes() <= 1.25 * stored, (n, k, w.resident_bytes() / stored)


def test_save_load_rebuilds_the_fast_path(tmp_path) -> None:
    model = torch.nn.Sequential(_qlinear(k=160, n=96), torch.nn.GELU(), _qlinear(bits=2, group_size=32, n=40, k=96))
    save_quantized(model, tmp_path / "ck")
    skeleton = torch.nn.Sequential(torch.nn.Linear(160, 96), torch.nn.GELU(), torch.nn.Linear(96, 40))
    loaded = load_quantized(skeleton, tmp_path / "ck")
    assert all(m.weight.code_layout == "cpu_int4" for m in (loaded[0], loaded[2]))
    x = torch.randn(4, 160)
    before = dispatch.CALLS["cpu_int4"]
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert dispatch.CALLS["cpu_int4"] == before + 4


def test_torch_save_stores_the_portable_codes(monkeypatch) -> None:
    """torch.save holds the stored bit planes (the CPU operand's order depends on the CPU),
    and torch.load derives the CPU layout again."""
    lin = _qlinear()
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["weight"].code_layout == "cpu_int4"
    assert torch.equal(sd["weight"].cpu_int4_codes, lin.weight.cpu_int4_codes)
    buf.seek(0)
    monkeypatch.setattr(cpu_layout, "available", lambda: False)  # load as a machine without the kernel would
    raw = torch.load(buf, weights_only=True)["weight"]
    assert raw.code_layout == "planes" and raw.cpu_int4_codes is None
    assert torch.equal(raw.packed_codes, lin.weight.packed().packed_codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_to_dtype_keeps_working(dtype) -> None:
    model = torch.nn.Sequential(_qlinear(), torch.nn.ReLU(), _qlinear(bits=3, n=40, k=96))
    model = model.to(dtype)
    assert model[0].weight.dtype == dtype and model[0].weight.dequantize().dtype == dtype
    assert model[0].bias.dtype == dtype
    x = torch.randn(2, 160, dtype=dtype)
    assert model(x).dtype == dtype
    check_close(model[0](x), x, model[0].weight.packed(), model[0].bias)


def test_model_to_cpu_and_meta() -> None:
    lin = _qlinear().to("cpu")
    assert lin.weight.code_layout == "cpu_int4"
    meta = lin.to("meta")
    assert meta.weight.device.type == "meta" and meta.weight.code_layout == "planes"
    assert F.linear(torch.empty(2, 160, device="meta"), meta.weight).shape == (2, 96)


def test_embedding_lookup_of_a_tied_quantized_weight() -> None:
    w = GWQTensor.from_float(torch.randn(300, 96), torch.rand(300, 96) < 0.03, 4, 32)
    emb = torch.nn.Embedding(300, 96)
    emb.weight = torch.nn.Parameter(w, requires_grad=False)
    ids = torch.tensor([[5, 299, 0], [5, 7, 123]])
    out = emb(ids)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, w.dequantize()[ids], rtol=0, atol=0)
    with pytest.raises(IndexError, match="token id 300 is out of range for a vocabulary of 300"):
        emb(torch.tensor([1, 300]))
    with pytest.raises(IndexError, match="token id -1"):
        emb(torch.tensor([-1]))


def test_generate_eager_and_static_cache_compiled_agree() -> None:
    """model.generate on a GWQ model (quantized head included): eagerly, then with a static
    cache and torch.compile(model.forward): the same greedy tokens, through the fast path."""
    torch._dynamo.reset()
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    model = tiny_llama(tie=False)
    quantize_(model, GWQConfig(head_bits=8, group_size=32, progress=False), calibration_data=ids)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids[:, :8], **kwargs)
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, fullgraph=True)
        compiled = model.generate(ids[:, :8], **kwargs)
        events = _kernel_events(lambda: model.generate(ids[:, :8], **kwargs))
    assert events["gwq_cpu::linear"] == 6 * 15  # 6 steps x (14 linears + the head), the compiled kernel in the graph
    assert len(set(eager[0, 8:].tolist())) > 1  # a real continuation, not one token repeated
    assert torch.equal(eager, compiled)


def test_without_a_compiler_the_aten_version_runs_with_one_warning(monkeypatch) -> None:
    """A failed build is said once, and GWQ_KERNEL=cpu (insisting on the compiled kernel) is an error."""
    monkeypatch.setattr(cpu_kernel, "_load", lambda: "CalledProcessError: g++ not found")
    cpu_kernel._warn_once.cache_clear()
    lin = _qlinear()
    x = torch.randn(2, 160)
    before = dict(dispatch.CALLS)
    with pytest.warns(UserWarning, match="could not be built .*g\\+\\+ not found.*ATen-op version"):
        y = lin(x)
    assert dispatch.CALLS["cpu_int4_aten"] == before.get("cpu_int4_aten", 0) + 1
    check_close(y, x, lin.weight.packed(), lin.bias.detach())
    monkeypatch.setenv(dispatch.KERNEL_ENV, "cpu")
    with pytest.raises(RuntimeError, match="GWQ_KERNEL=cpu, but the GWQ CPU kernel could not be built: CalledProcessError"):
        lin(x)
    cpu_kernel._warn_once.cache_clear()
