"""The launcher's hot path (``gwq_compile.codegen.launch``): one config choice per shape,
then plain launches that allocate nothing but the output.

On CPU the kernels run on the Triton interpreter (nothing is timed there); the tuner
itself is checked with a stand-in for ``triton.testing.do_bench``.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gwq_compile import packing
from gwq_compile.codegen import kernel_modules, launch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weight(n: int = 24, k: int = 70, bits: int = 4, group_size: int = 32, density: float = 0.05) -> packing.PackedWeight:
    gen = torch.Generator().manual_seed(n * k + bits)
    w = torch.randn(n, k, generator=gen)
    p = packing.quantize_weight(w, torch.rand(n, k, generator=gen) < density, bits=bits, group_size=group_size)
    return packing.PackedWeight(*(t.to(DEVICE) for t in p[:6]), *p[6:])


def _run(x: torch.Tensor, p: packing.PackedWeight, **kw) -> torch.Tensor:
    return launch.gwq_linear_triton(x, *p[:6], None, p.bits, p.group_size, p.in_features, **kw)


class _AtenLog(TorchDispatchMode):
    """Counts the aten ops the launcher runs, and its kernel launches (whatever the
    interpreter does inside a launch is not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, kernel):
        log = self

        class Launcher:
            def __getitem__(self, grid):
                def launch_kernel(*args, **kwargs):
                    log.launches.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
                    with _disable_current_modes():
                        return kernel[grid](*args, **kwargs)

                return launch_kernel

        return Launcher()


@pytest.fixture
def aten_log(monkeypatch):
    log = _AtenLog()
    monkeypatch.setattr(launch, "_identity", log.wrap)
    if DEVICE.type == "cuda":
        pytest.skip("the launch log wraps the interpreter's launcher (CPU)")
    return log


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(launch, "CHOSEN", {})


def test_config_is_chosen_once_per_shape(monkeypatch) -> None:
    """The family's default/candidates are consulted on the first call of a shape only;
    later calls of that shape are a dict lookup, and a new shape gets its own entry."""
    gemv = kernel_modules.kernel_modules(interpret=DEVICE.type == "cpu").gemv
    calls = []
    original = gemv.default_config
    monkeypatch.setattr(gemv, "default_config", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    monkeypatch.setenv(launch.TUNE_ENV, "0")  # on CUDA too: no timing, the default is kept
    p = _weight()
    ref = packing.dequantize_weight(p)
    for _ in range(3):
        x = torch.randn(2, 70, device=DEVICE)
        torch.testing.assert_close(_run(x, p), x @ ref.T, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1 and len(launch.CHOSEN) == 1
    _run(torch.randn(5, 70, device=DEVICE), p)  # 5 rows -> BLOCK_M 8: another key
    assert len(calls) == 2 and len(launch.CHOSEN) == 2
    (key, (cfg, tuned)), *_ = launch.CHOSEN.items()
    assert key[0] == "gemv" and not tuned


def test_tuner_times_each_candidate_once_and_keeps_the_fastest(monkeypatch) -> None:
    """``choose_config`` with timing allowed: every candidate run through ``do_bench`` once,
    the fastest kept (a failing candidate skipped), then no timing at all for that key."""
    import triton.testing

    fake_ms = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_bench(fn, **kw):
        return fn()

    def run(cfg):
        timed.append(cfg)
        if cfg == "bad":
            raise RuntimeError("out of resources")
        return fake_ms[cfg]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    key = ("gemv", "test")
    first = launch.choose_config(key, lambda: "a", lambda: ["a", "bad", "b", "c"], run, can_time=True)
    assert first == "b" and timed == ["a", "bad", "b", "c"]
    again = launch.choose_config(key, lambda: "a", lambda: ["a", "b", "c"], run, can_time=True)
    assert again == "b" and len(timed) == 4 and launch.CHOSEN[key] == ("b", True)


def test_untuned_default_is_tuned_by_a_later_eager_call(monkeypatch) -> None:
    """A key first seen where nothing can be timed (a traced call) keeps the default until
    a call that can time it tunes it."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    key = ("dense", "test")
    assert launch.choose_config(key, lambda: "d", lambda: ["x", "y"], lambda c: {"x": 2.0, "y": 1.0}[c], can_time=False) == "d"
    assert launch.CHOSEN[key] == ("d", False)
    assert launch.choose_config(key, lambda: "d", lambda: ["x", "y"], lambda c: {"x": 2.0, "y": 1.0}[c], can_time=True) == "y"
    assert launch.choose_config(key, lambda: "d", lambda: ["x", "y"], lambda c: 0.0, can_time=False) == "y"


def test_nothing_is_timed_on_the_interpreter(monkeypatch) -> None:
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **kw: pytest.fail("do_bench called on the interpreter"))
    p = _weight()
    _run(torch.randn(3, 70), packing.PackedWeight(*(t.cpu() for t in p[:6]), *p[6:]))
    _run(torch.randn(30, 70), packing.PackedWeight(*(t.cpu() for t in p[:6]), *p[6:]))
    assert all(not tuned for _, tuned in launch.CHOSEN.values()) and len(launch.CHOSEN) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gemv_without_split_allocates_only_the_output(dtype: torch.dtype, aten_log) -> None:
    """With ``SPLIT_K=1`` a GEMV call runs no aten op that writes memory besides allocating
    its output: no workspace, no memset, no cast (the kernel stores in x's dtype)."""
    p = _weight(40, 100, 3, 64, density=0.1)
    x = torch.randn(4, 100, device=DEVICE, dtype=dtype)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}
    _run(x, p, path="gemv", config=cfg)  # warm: kernel modules loaded, kernel compiled
    aten_log.launches.clear()
    with aten_log as log:
        y = _run(x, p, path="gemv", config=cfg)
    writes = {op: c for op, c in log.ops.items() if op not in ("empty", "view", "reshape", "_reshape_alias", "as_strided", "alias", "detach")}
    assert writes == {} and log.ops["empty"] == 1, dict(log.ops)
    assert log.launches == ["gwq_gemv_kernel"]
    ref = x.double() @ packing.dequantize_weight(p, torch.float64).T
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


def test_split_k_accumulates_in_fp32(aten_log) -> None:
    """``SPLIT_K > 1`` zeroes an fp32 output for its atomic adds, then casts for fp16 x."""
    p = _weight(40, 100, 4, 32, density=0.1)
    x = torch.randn(3, 100, device=DEVICE, dtype=torch.float16)
    with aten_log as log:
        y = _run(x, p, path="gemv", config={"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 4})
    assert log.launches == ["gwq_gemv_kernel"]
    assert log.ops["zeros"] + log.ops["zero_"] + log.ops["fill_"] >= 1 and log.ops["_to_copy"] == 1, dict(log.ops)
    assert y.dtype == torch.float16
    ref = x.double() @ packing.dequantize_weight(p, torch.float64).T
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


def test_dense_path_is_one_weight_allocation(aten_log) -> None:
    """The dense path writes its weight, outliers included, with one kernel: one ``empty``
    of ``[N, K]``, no second (scatter) pass through aten, then the product."""
    p = _weight(24, 70, 4, 32, density=0.2)
    x = torch.randn(20, 70, device=DEVICE)
    _run(x, p, path="dense")
    aten_log.launches.clear()
    with aten_log as log:
        y = _run(x, p, path="dense")
    assert log.launches == ["gwq_dequant_kernel"]
    assert log.ops["empty"] == 1 and not (log.ops["index_put_"] or log.ops["scatter_"] or log.ops["zeros"]), dict(log.ops)
    torch.testing.assert_close(y, x @ packing.dequantize_weight(p).T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="timing candidates needs a GPU")
@pytest.mark.parametrize("m", [1, 16, 64])
def test_tuned_configs_on_cuda(m: int, monkeypatch) -> None:
    """The first eager CUDA call of a shape times the candidates and keeps one; the result is
    right and the next call launches the kept config without timing anything."""
    import triton.testing

    monkeypatch.delenv(launch.TUNE_ENV, raising=False)
    p = _weight(256, 512, 4, 128, density=0.01)
    x = torch.randn(m, 512, device=DEVICE, dtype=torch.float16)
    y = _run(x, p)
    assert len(launch.CHOSEN) == 1 and next(iter(launch.CHOSEN.values()))[1]
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **kw: pytest.fail("timed again"))
    torch.testing.assert_close(_run(x, p), y)
    ref = x.double() @ packing.dequantize_weight(p, torch.float64).T
    torch.testing.assert_close(y.double(), ref, rtol=5e-3, atol=5e-3)
