"""Thin launchers for the GWQ Triton kernels and the ``gwq::linear_triton`` op.

:func:`gwq_linear_triton` takes exactly the arguments of ``torch.ops.gwq.linear`` (plus
two keyword-only knobs for tests and benchmarks), checks them, flattens the leading dims
of ``x``, picks the kernel family and its config, allocates the output and launches.

Kernel family (chosen by :func:`gwq_compile.dispatch.triton_family`, the one place that
decides paths): ``M <= SMALL_M_MAX`` (16) rows go to the fused GEMV
(:mod:`~gwq_compile.codegen.gemv`), larger M to the dense path
(:mod:`~gwq_compile.codegen.dequant`: one kernel writes the dense weight, outliers
included, in x's dtype; then ``F.linear``/cuBLAS multiplies).

Config choice, once per shape (:func:`choose_config`): the first call for a key (family,
device, x dtype, N, K, rows per program, bits, group size, outliers, bias) on real CUDA
tensors times the family's candidate configs once (``triton.testing.do_bench``; split-K
candidates are timed with their memset and cast) and keeps the fastest in
:data:`CHOSEN`.  Later calls look the key up in that dict and launch the plain
``@triton.jit`` kernel with it: no ``triton.autotune`` dispatch per call.  Where nothing
can be timed (the call is being traced by torch.compile, captured in a CUDA graph, runs
on the interpreter, or ``GWQ_TUNE=0``) the family's ``default_config`` is used (a
``SPLIT_K=1`` GEMV: one launch, nothing allocated but the output) and a later eager call
may still tune that key.

Inputs: ``x`` may have any leading dims and any strides.  It is flattened with
``x.reshape(-1, K)`` (a view whenever the leading dims can be merged) and *both* strides
are passed to the kernel, so non-contiguous activations are not copied.  The weight
fields must be contiguous (they are, as produced by :mod:`gwq_compile.packing`).

Devices: CUDA tensors run the compiled kernels; CPU tensors run them on the Triton
interpreter.  Triton fixes that choice when ``@triton.jit`` decorates a function, so
:func:`~gwq_compile.codegen.kernel_modules.kernel_modules` keeps one copy of the kernel modules per mode and loads the
interpreted one on demand; no ``TRITON_INTERPRET`` is needed for CPU tensors.  Nothing
here needs a GPU, or even ``triton``, at import time.

Registration: ``torch.ops.gwq.linear_triton`` is a ``torch.library.triton_op`` whose body
launches the kernels through ``torch.library.wrap_triton``, so Inductor sees the kernels
inside compiled graphs on CUDA (and CUDA graphs can capture them: the body allocates only
its outputs and never syncs).  On CPU a triton_op cannot run inside ``torch.compile``
(the interpreter needs real data pointers), so CPU callers use ``torch.ops.gwq.linear``
(an opaque op that calls :func:`gwq_linear_triton`).

Example:
    >>> import torch
    >>> from gwq_compile import packing
    >>> from gwq_compile.codegen.launch import gwq_linear_triton
    >>> w = torch.randn(48, 100); mask = torch.rand_like(w) < 0.02
    >>> p = packing.quantize_weight(w, mask, bits=3, group_size=32)
    >>> x = torch.randn(2, 5, 100)
    >>> y = gwq_linear_triton(x, *p[:6], None, p.bits, p.group_size, p.in_features)
    >>> ref = x @ packing.dequantize_weight(p).T
    >>> y.shape, bool(torch.allclose(y, ref, atol=1e-4, rtol=1e-4))
    (torch.Size([2, 5, 48]), True)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from gwq_compile import dispatch, ops, packing
from gwq_compile.codegen.kernel_modules import kernel_modules, require_triton, use_interpreter

__all__ = ["CHOSEN", "choose_config", "gwq_dequantize_triton", "gwq_linear_triton"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TUNE_ENV = "GWQ_TUNE"
#: ``key -> (config, tuned)`` for every shape seen; ``tuned`` is False for a default config.
CHOSEN: dict[tuple, tuple[Any, bool]] = {}


# ----------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, p: packing.PackedWeight, bias: Optional[torch.Tensor]) -> None:
    """Raise a clear error, naming the argument, for anything the kernels cannot take."""
    packing.check_bits(p.bits)
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"gwq_linear_triton: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != p.in_features:
        raise ValueError(f"gwq_linear_triton: x has shape {tuple(x.shape)}, its last dim must be in_features={p.in_features}")
    n = p.packed_codes.shape[0] if p.packed_codes.dim() == 2 else -1
    groups = packing.num_groups(p.in_features, p.group_size)
    expected = {
        "packed_codes": (p.packed_codes, (torch.uint8,), (n, packing.packed_row_bytes(p.in_features, p.bits))),
        "group_scales": (p.group_scales, (torch.float16,), (n, groups)),
        "group_zeros": (p.group_zeros, (torch.uint8,), (n, groups)),
        "outlier_row_ptr": (p.outlier_row_ptr, (torch.int32,), (n + 1,)),
        "outlier_col_idx": (p.outlier_col_idx, (torch.int16, torch.int32), (p.outlier_values.shape[0],)),
        "outlier_values": (p.outlier_values, (torch.float16,), (p.outlier_col_idx.shape[0],)),
    }
    if bias is not None:
        expected["bias"] = (bias, _ACT_DTYPES, (n,))
    for name, (t, dtypes, shape) in expected.items():
        if t.dtype not in dtypes:
            raise TypeError(f"gwq_linear_triton: {name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"gwq_linear_triton: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.device != x.device:
            raise ValueError(f"gwq_linear_triton: {name} is on {t.device} but x is on {x.device}")
    if p.in_features > torch.iinfo(torch.int16).max and p.outlier_col_idx.dtype != torch.int32:
        raise TypeError(f"gwq_linear_triton: outlier_col_idx must be int32 when in_features > 32767, got {p.outlier_col_idx.dtype}")


def _forced_config(config: Mapping[str, int], family: str, module: ModuleType, block_m: int) -> Any:
    """An explicit config (tests, benchmarks) checked against the family's knobs."""
    triton = require_triton()
    unknown = set(config) - set(module.KNOBS)
    if unknown:
        raise ValueError(f"gwq_linear_triton: config keys {sorted(unknown)} are not knobs of the {family} kernel ({sorted(module.KNOBS)})")
    kw = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    required = {"BLOCK_N", "BLOCK_K"}
    if required - set(kw):
        raise ValueError(f"gwq_linear_triton: config for the {family} kernel lacks {sorted(required - set(kw))}")
    kw.setdefault("SPLIT_K" if family == "gemv" else "K_TILES", 1)
    if family == "gemv":
        kw.setdefault("BLOCK_M", block_m)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key in kw and (kw[key] < 1 or kw[key] & (kw[key] - 1)):
            raise ValueError(f"gwq_linear_triton: config {key} must be a power of two, got {kw[key]}")
    if kw["BLOCK_K"] < 8:
        raise ValueError(f"gwq_linear_triton: BLOCK_K must be >= 8 (a byte of the 1-bit plane), got {kw['BLOCK_K']}")
    if family == "gemv" and kw["BLOCK_M"] >= 16 and min(kw["BLOCK_N"], kw["BLOCK_K"]) < 16:
        raise ValueError(f"gwq_linear_triton: tl.dot (BLOCK_M >= 16) needs BLOCK_N and BLOCK_K >= 16, got {kw}")
    if kw.get("SPLIT_K", 1) < 1 or kw.get("K_TILES", 1) < 1:
        raise ValueError(f"gwq_linear_triton: config SPLIT_K / K_TILES must be >= 1, got {kw}")
    return triton.Config(kw, num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3))


# ----------------------------------------------------------------------------- config choice, once per shape


def _can_time(x: torch.Tensor, interpret: bool) -> bool:
    """Whether candidate configs can be timed now: real CUDA tensors, run eagerly."""
    if interpret or x.device.type != "cuda" or type(x) is not torch.Tensor or os.environ.get(TUNE_ENV, "1") == "0":
        return False
    return not (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing())


def choose_config(key: tuple, default: Callable[[], Any], candidates: Callable[[], list], run: Callable[[Any], Any], can_time: bool) -> Any:
    """The config for ``key``: a dict lookup after the first call.  The first call that
    ``can_time`` times every candidate with ``run(config)`` (all launches it needs) and
    keeps the fastest; otherwise ``default()`` is kept, to be tuned by a later eager call."""
    hit = CHOSEN.get(key)
    if hit is not None and (hit[1] or not can_time):
        return hit[0]
    if not can_time:
        CHOSEN[key] = (default(), False)
        return CHOSEN[key][0]
    import triton.testing  # noqa: PLC0415

    best, best_ms = None, float("inf")
    for config in candidates():
        try:
            ms = triton.testing.do_bench(lambda: run(config), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - a candidate that fails to compile (e.g. out of shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    CHOSEN[key] = (best if best is not None else default(), True)
    return CHOSEN[key][0]


# ----------------------------------------------------------------------------- launch


def _identity(kernel: object) -> object:
    return kernel


def _launch(wrap: Callable[[object], object], x: torch.Tensor, *args, path: str = "auto", config: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """Shared body of the plain launcher and the triton_op; ``wrap`` is identity or
    ``wrap_triton`` (which must not see interpreted kernels).  ``args``: ``ops.STORED_SCHEMA`` after ``x``."""
    triton = require_triton()
    packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, k = args
    group_size = packing.effective_group_size(k, group_size)
    _check(x, packing.PackedWeight(*args[:6], bits, group_size, k), bias)
    interpret = use_interpreter(x.device)
    if interpret and x.dtype == torch.bfloat16:
        raise TypeError(
            "gwq_linear_triton: bfloat16 activations need a GPU: the Triton interpreter used for CPU tensors "
            "computes with numpy, which has no bfloat16 (use float16/float32 or GWQ_KERNEL=reference)"
        )
    mods = kernel_modules(interpret)
    if interpret:
        wrap = _identity
    n = packed_codes.shape[0]
    x2 = x.reshape(-1, k)  # a view whenever possible: strides go to the kernel, no copy
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    family = dispatch.triton_family(m, path)
    if not is_fake(x):  # a real run, not a trace: counted for tests (dispatch.CALLS["triton_gemv" / "triton_dense"])
        dispatch.count(f"triton_{family}")
    if m == 0 or n == 0:
        return x.new_zeros(out_shape)
    # The kernels index every weight field and the bias with unit inner stride (no-ops for
    # tensors from gwq_compile.packing).
    fields = [t.contiguous() for t in (packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values)]
    if family == "dense":
        weight = _dequantize(wrap, mods.dequant, *fields, bits, group_size, k, x.dtype, config, _can_time(x, interpret))
        # fp32 x: torch.matmul's default fp32 product (TF32 only if the user enabled it).
        return torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype)).reshape(out_shape)

    gemv = mods.gemv
    block_m = gemv.block_m_for(m)
    plane1_offset = packing.plane_offsets(k, bits)[1] if bits == 3 else 0
    has_bias, has_outliers = bias is not None, fields[5].numel() > 0
    bias_arg = bias.contiguous() if has_bias else x2  # never read when HAS_BIAS is False
    common = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=has_bias, HAS_OUTLIERS=has_outliers)

    def run(cfg: Any) -> torch.Tensor:
        kw = {"BLOCK_M": block_m, **cfg.kwargs}
        split = kw["SPLIT_K"] > 1
        # SPLIT_K > 1 adds fp32 partial sums atomically: a zeroed fp32 output (cast below).
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split else torch.empty(m, n, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"], triton.cdiv(m, kw["BLOCK_M"]))
        wrap(gemv.gwq_gemv_kernel)[grid](
            x2, *fields, bias_arg, out, m, n, k, plane1_offset,
            x2.stride(0), x2.stride(1), fields[0].stride(0), fields[1].stride(0), fields[2].stride(0), out.stride(0),
            **common, **kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return out.to(x.dtype) if split else out

    if config is not None:
        cfg = _forced_config(config, "gemv", gemv, block_m)
    else:
        key = ("gemv", x.device.index, x.dtype, n, k, block_m, bits, group_size, has_outliers, has_bias)
        cfg = choose_config(
            key,
            lambda: gemv.default_config(n, k, block_m, group_size),
            lambda: gemv.prune(gemv.configs(), n, k, block_m, group_size),
            run,
            _can_time(x, interpret),
        )
    return run(cfg).reshape(out_shape)


def _dequantize(
    wrap: Callable[[object], object], mod: ModuleType, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, bits: int, group_size: int, k: int,
    dtype: torch.dtype, config: Optional[Mapping[str, int]], can_time: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Dense ``[N, K]`` weight in ``dtype``, outliers included: one launch."""
    triton = require_triton()
    n = codes.shape[0]
    plane1_offset = packing.plane_offsets(k, bits)[1] if bits == 3 else 0
    has_outliers = values.numel() > 0

    def run(cfg: Any) -> torch.Tensor:
        weight = torch.empty(n, k, device=codes.device, dtype=dtype)
        span = cfg.kwargs["BLOCK_K"] * cfg.kwargs["K_TILES"]
        wrap(mod.gwq_dequant_kernel)[(triton.cdiv(n, cfg.kwargs["BLOCK_N"]), triton.cdiv(k, span))](
            codes, scales, zeros, row_ptr, col_idx, values, weight,
            n, k, plane1_offset, codes.stride(0), scales.stride(0), zeros.stride(0), weight.stride(0),
            BITS=bits, GROUP_SIZE=group_size, HAS_OUTLIERS=has_outliers,
            **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return weight

    if config is not None:
        cfg = _forced_config(config, "dense", mod, 0)
    else:
        key = ("dense", codes.device.index, dtype, n, k, bits, group_size, has_outliers)
        cfg = choose_config(
            key, lambda: mod.default_config(n, k, group_size), lambda: mod.prune(mod.configs(), n, k, group_size), run, can_time
        )
    return run(cfg)


def gwq_dequantize_triton(packed: packing.PackedWeight, dtype: torch.dtype = torch.float32, config: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """The dense weight ``dequant(codes) + scatter(outliers)`` computed by the dense path's
    kernel (compiled on CUDA, interpreted on CPU); equal to
    :func:`gwq_compile.packing.dequantize_weight` in fp32.

    Example:
        >>> import torch
        >>> from gwq_compile import packing
        >>> p = packing.quantize_weight(torch.randn(8, 50), torch.rand(8, 50) < 0.1, bits=3, group_size=16)
        >>> bool(torch.equal(gwq_dequantize_triton(p), packing.dequantize_weight(p)))
        True
    """
    if dtype not in _ACT_DTYPES:
        raise TypeError(f"gwq_dequantize_triton: dtype must be float16, bfloat16 or float32, got {dtype}")
    interpret = use_interpreter(packed.packed_codes.device)
    if interpret and dtype == torch.bfloat16:
        raise TypeError("gwq_dequantize_triton: bfloat16 needs a GPU (the Triton interpreter has no bfloat16)")
    fields = [t.contiguous() for t in packed[:6]]
    can_time = not interpret and os.environ.get(TUNE_ENV, "1") != "0" and not torch.cuda.is_current_stream_capturing()
    return _dequantize(_identity, kernel_modules(interpret).dequant, *fields, packed.bits, packed.group_size, packed.in_features, dtype, config, can_time)


def gwq_linear_triton(x: torch.Tensor, *args, path: str = "auto", config: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """GWQ linear ``x @ W.T + bias`` with the Triton kernels.

    Args:
        x: activations ``[..., in_features]``, fp16/bf16/fp32, any strides; the output
            has ``x``'s dtype and leading dims.
        args: the rest of ``torch.ops.gwq.linear``'s arguments (:data:`gwq_compile.ops.STORED_SCHEMA`):
            the six tensors of the packed weight (:class:`gwq_compile.packing.PackedWeight`),
            ``bias`` (optional ``[out_features]``), ``bits``, ``group_size`` (-1 means per
            channel) and ``in_features``.
        path: ``"auto"`` (``M <= 16`` -> GEMV, else dense), ``"gemv"`` or ``"dense"``.
        config: explicit tile knobs (e.g. ``{"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}``)
            that bypass the config choice; for tests and benchmarks.

    Example:
        >>> import torch
        >>> from gwq_compile import packing
        >>> p = packing.quantize_weight(torch.randn(40, 64), None, bits=4, group_size=32)
        >>> y = gwq_linear_triton(torch.randn(3, 64), *p[:6], None, 4, 32, 64, path="dense")
        >>> y.shape
        torch.Size([3, 40])
    """
    return _launch(_identity, x, *args, path=path, config=config)


def _wrap_triton(kernel: object) -> object:
    from torch.library import wrap_triton  # noqa: PLC0415

    return wrap_triton(kernel)


def _linear_triton_op(x: torch.Tensor, *args) -> torch.Tensor:
    """``torch.ops.gwq.linear_triton``: :func:`gwq_linear_triton` visible to Inductor (CUDA);
    arguments as ``torch.ops.gwq.linear`` (:data:`gwq_compile.ops.STORED_SCHEMA`)."""
    dispatch.check_input(x, args[0], args[-1])
    return _launch(_wrap_triton, x, *args)


_linear_triton_op.__signature__ = ops.signature(ops.STORED_FIELDS)  # triton_op infers its schema from it
torch.library.triton_op("gwq::linear_triton", _linear_triton_op, mutates_args=())
# Same gradients as torch.ops.gwq.linear: to the activation and bias, the weight is frozen.
torch.library.register_autograd("gwq::linear_triton", ops.backward, setup_context=ops.setup_stored_context)
