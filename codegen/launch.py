"""Thin launchers for the GWQ Triton kernels and the ``gwq::linear_triton`` op.

:func:`gwq_linear_triton` takes exactly the arguments of ``torch.ops.gwq.linear``
(plus two keyword-only knobs for tests and benchmarks), checks them, flattens the
leading dims of ``x``, picks the kernel family, allocates the output and launches.

Kernel family (chosen by :func:`gwq_compile.dispatch.triton_family`, the one place that
decides paths): ``M <= SMALL_M_MAX`` (16) rows go to the GEMV / split-K kernel, larger M to
the dense path (a Triton kernel dequantizes the weight, outliers included, into x's dtype,
then ``F.linear``/cuBLAS multiplies); the fused tiled ``tl.dot`` GEMM stays available as
``path="gemm"`` (``path=`` forces any of the three).  The two fused families read the
CSR outliers in-kernel (see :mod:`gwq_compile.codegen.kernels`).

Inputs: ``x`` may have any leading dims and any strides.  It is flattened with
``x.reshape(-1, K)`` (a view whenever the leading dims can be merged, which includes
every slice along K or a transposed 2-D input) and *both* strides are passed to the
kernel, so non-contiguous activations are not copied.  The weight fields must be
contiguous (they are, as produced by :mod:`gwq_compile.packing`).

Devices: CUDA tensors run the compiled kernels; CPU tensors run them on the Triton
interpreter.  Triton fixes that choice when ``@triton.jit`` decorates a function (for
its own ``tl.*`` library: when triton is first imported), so this module keeps one copy
of :mod:`gwq_compile.codegen.kernels` per mode and loads the interpreted one on demand;
no ``TRITON_INTERPRET`` is needed for CPU tensors.  (With ``TRITON_INTERPRET=1`` set
before triton's import, everything, CUDA tensors included, runs on the interpreter.)
Nothing here needs a GPU, or even ``triton``, at import time.

Registration: ``torch.ops.gwq.linear_triton`` is a ``torch.library.triton_op`` whose
body launches the kernels through ``torch.library.wrap_triton``, so Inductor sees (and
can fuse around) the kernel inside compiled graphs on CUDA.  On CPU, a triton_op
cannot run inside ``torch.compile`` (the interpreter needs real data pointers), so CPU
callers use ``torch.ops.gwq.linear`` (an opaque custom op that calls
:func:`gwq_linear_triton`), which works eagerly and compiled.

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

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Callable, Optional

import torch

from gwq_compile import dispatch, ops, packing

__all__ = ["gwq_dequantize_triton", "gwq_linear_triton", "kernels_module", "triton_interpreting", "use_interpreter"]

_KERNELS = "gwq_compile.codegen.kernels"
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_loaded: dict[bool, ModuleType] = {}
_CONFIG_KEYS = {
    "dense": {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"},
    "splitk": {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages"},
    "gemm": {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"},
}


# ----------------------------------------------------------------------------- kernel module / interpreter


def _require_triton() -> ModuleType:
    try:
        import triton  # noqa: PLC0415  (optional dependency: imported only when a kernel is used)
    except ImportError as exc:
        raise ImportError(
            "the GWQ Triton kernels (GWQ_KERNEL=triton, or CUDA tensors by default) need the `triton` "
            "package (pip install 'triton>=3.3'), which cannot be imported; use GWQ_KERNEL=reference"
        ) from exc
    return triton


def triton_interpreting() -> bool:
    """Whether triton itself was imported for the interpreter (``TRITON_INTERPRET=1``).

    Triton decorates its own ``tl.*`` library for the compiler or the interpreter when it
    is first imported (``import gwq_compile`` imports it, through torchao), so this checks
    the library rather than the environment.  In such a process every kernel runs on
    the interpreter, CUDA tensors included (through host copies): a debugging mode.

    Example:
        >>> from gwq_compile.codegen.launch import triton_interpreting
        >>> isinstance(triton_interpreting(), bool)
        True
    """
    _require_triton()
    import triton.language as tl  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    return not isinstance(tl.zeros, JITFunction)


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """Set ``TRITON_INTERPRET`` while a copy of our kernels is decorated, then restore it,
    so the choice never leaks into anyone else's kernels."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def kernels_module(interpret: bool) -> ModuleType:
    """:mod:`gwq_compile.codegen.kernels` decorated for the interpreter or the compiler.

    The regular module is used when its mode fits (it is imported under the wanted mode
    if nobody imported it yet); otherwise a private copy is loaded with
    ``TRITON_INTERPRET`` set accordingly for the duration of that import.  This works
    because the kernels call only triton builtins (see :mod:`~gwq_compile.codegen.kernels`).

    Example:
        >>> from gwq_compile.codegen.launch import kernels_module
        >>> kernels_module(interpret=True).INTERPRETED
        True
    """
    if interpret in _loaded:
        return _loaded[interpret]
    _require_triton()
    if not interpret and triton_interpreting():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: GWQ kernels can only run on the interpreter here")
    with _interpret_env(interpret):
        module = sys.modules.get(_KERNELS) or importlib.import_module(_KERNELS)
        if module.INTERPRETED != interpret:
            name = f"{_KERNELS}_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, module.__file__)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    if module.INTERPRETED != interpret:  # e.g. triton.knobs.runtime.interpret forced in code
        raise RuntimeError(
            f"could not decorate the GWQ kernels for the {'interpreter' if interpret else 'compiler'}: "
            "triton.knobs.runtime.interpret seems to be overridden in code; leave the choice to TRITON_INTERPRET"
        )
    _loaded[interpret] = module
    return module


def use_interpreter(device: torch.device) -> bool:
    """CPU tensors run on the Triton interpreter; CUDA ones compiled, unless triton itself
    was imported for the interpreter.

    Example:
        >>> import torch
        >>> from gwq_compile.codegen.launch import use_interpreter
        >>> use_interpreter(torch.device("cpu"))
        True
    """
    if device.type == "cpu":
        return True
    if device.type in ("cuda", "xpu"):
        return triton_interpreting()
    raise ValueError(f"gwq_linear_triton: x is on {device}; the Triton kernels support cuda (and cpu on the interpreter)")


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


def _check_config(config: Mapping[str, int], path: str, block_m: int) -> dict[str, int]:
    unknown = set(config) - _CONFIG_KEYS[path]
    if unknown:
        raise ValueError(f"gwq_linear_triton: config keys {sorted(unknown)} are not knobs of the {path} kernel ({sorted(_CONFIG_KEYS[path])})")
    cfg = dict(config)
    required = {"BLOCK_N", "BLOCK_K"} | {"splitk": {"SPLIT_K"}, "gemm": {"BLOCK_M"}, "dense": set()}[path]
    missing = required - set(cfg)
    if missing:
        raise ValueError(f"gwq_linear_triton: config for the {path} kernel lacks {sorted(missing)}")
    if path != "dense":
        cfg.setdefault("BLOCK_M", block_m)  # split-K: from M unless forced
    if path == "gemm":
        cfg.setdefault("GROUP_M", 8)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if key not in cfg:
            continue
        value = cfg[key]
        if value < 1 or value & (value - 1):
            raise ValueError(f"gwq_linear_triton: config {key} must be a power of two, got {value}")
    uses_dot = path == "gemm" or (path == "splitk" and cfg["BLOCK_M"] >= 16)
    if uses_dot and min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) < 16:
        raise ValueError(f"gwq_linear_triton: tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16, got {cfg}")
    if path == "dense" and cfg["BLOCK_K"] < 8:
        raise ValueError(f"gwq_linear_triton: the dense path needs BLOCK_K >= 8 (a byte of the 1-bit plane), got {cfg['BLOCK_K']}")
    if cfg.get("SPLIT_K", 1) < 1:
        raise ValueError(f"gwq_linear_triton: config SPLIT_K must be >= 1, got {cfg['SPLIT_K']}")
    return cfg


# ----------------------------------------------------------------------------- launch


def _launch(
    wrap: Callable[[object], object],
    x: torch.Tensor,
    *args,
    path: str = "auto",
    config: Optional[Mapping[str, int]] = None,
) -> torch.Tensor:
    """Shared body of the plain launcher and the triton_op; ``wrap`` is identity or
    ``wrap_triton`` (which must not see interpreted kernels).  ``args``: ``ops.STORED_SCHEMA`` after ``x``."""
    triton = _require_triton()
    packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, k = args
    group_size = packing.effective_group_size(k, group_size)
    _check(x, packing.PackedWeight(*args[:6], bits, group_size, k), bias)
    interpret = use_interpreter(x.device)
    if interpret and x.dtype == torch.bfloat16:
        raise TypeError(
            "gwq_linear_triton: bfloat16 activations need a GPU: the Triton interpreter used for CPU tensors "
            "computes with numpy, which has no bfloat16 (use float16/float32 or GWQ_KERNEL=reference)"
        )
    mod = kernels_module(interpret)
    if interpret:
        wrap = _identity

    n = packed_codes.shape[0]
    x2 = x.reshape(-1, k)  # a view whenever possible: strides go to the kernel, no copy
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    if m == 0 or n == 0:
        return x.new_zeros(out_shape)
    # The kernels index every weight field and the bias with unit inner stride (no-ops
    # for tensors from gwq_compile.packing).
    codes, scales, zeros = packed_codes.contiguous(), group_scales.contiguous(), group_zeros.contiguous()
    row_ptr, col_idx, values = outlier_row_ptr.contiguous(), outlier_col_idx.contiguous(), outlier_values.contiguous()
    plane1_offset = packing.plane_offsets(k, bits)[1] if bits == 3 else 0
    has_outliers = values.numel() > 0
    bias_arg = bias.contiguous() if bias is not None else x2  # x2 is never read when HAS_BIAS is False
    chosen = dispatch.triton_family(m, path)
    common = dict(BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, HAS_OUTLIERS=has_outliers)

    if chosen == "splitk":
        block_m = min(16, triton.next_power_of_2(m))
        workspace = torch.zeros(m, n, device=x.device, dtype=torch.float32)
        args = (
            x2, codes, scales, zeros, row_ptr, col_idx, values, bias_arg, workspace,
            m, n, k, plane1_offset,
            x2.stride(0), x2.stride(1), codes.stride(0), scales.stride(0), zeros.stride(0), workspace.stride(0),
        )  # fmt: skip
        if config is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(m, block_m))  # noqa: E731
            wrap(mod.gwq_splitk_autotuned)[grid](*args, **common, BLOCK_M=block_m)
        else:
            cfg = _check_config(config, "splitk", block_m)
            grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(m, cfg["BLOCK_M"]))
            wrap(mod.gwq_splitk_kernel)[grid](*args, **common, **cfg)
        out = workspace if x.dtype == torch.float32 else workspace.to(x.dtype)
    elif chosen == "dense":
        # W = dequant(codes) + scatter(outliers) in x's dtype (two launches), then cuBLAS.
        weight = _dequantize(wrap, mod, codes, scales, zeros, row_ptr, col_idx, values, bits, group_size, k, x.dtype, config)
        # fp32 x: torch.matmul's default fp32 product (TF32 only if the user enabled it).
        out = torch.nn.functional.linear(x2, weight, None if bias is None else bias.to(x.dtype))
    else:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        m_bucket = min(4096, max(16, triton.next_power_of_2(m)))
        args = (
            x2, codes, scales, zeros, row_ptr, col_idx, values, bias_arg, out,
            m, n, k, plane1_offset, m_bucket,
            x2.stride(0), x2.stride(1), codes.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        )  # fmt: skip
        if config is None:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            wrap(mod.gwq_gemm_autotuned)[grid](*args, **common)
        else:
            cfg = _check_config(config, "gemm", 32)
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            wrap(mod.gwq_gemm_kernel)[grid](*args, **common, **cfg)
    return out.reshape(out_shape)


def _dequantize(
    wrap: Callable[[object], object],
    mod: ModuleType,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    group_size: int,
    k: int,
    dtype: torch.dtype,
    config: Optional[Mapping[str, int]],
) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``: the dequantization kernel, then the outlier scatter."""
    triton = _require_triton()
    n = codes.shape[0]
    weight = torch.empty(n, k, device=codes.device, dtype=dtype)
    plane1_offset = packing.plane_offsets(k, bits)[1] if bits == 3 else 0
    args = (codes, scales, zeros, weight, n, k, plane1_offset, codes.stride(0), scales.stride(0), zeros.stride(0), weight.stride(0))
    if config is None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
        wrap(mod.gwq_dequant_autotuned)[grid](*args, BITS=bits, GROUP_SIZE=group_size)
    else:
        cfg = _check_config(config, "dense", 0)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
        wrap(mod.gwq_dequant_kernel)[grid](*args, BITS=bits, GROUP_SIZE=group_size, **cfg)
    if values.numel():
        rows_per_program = 128
        wrap(mod.gwq_scatter_outliers_kernel)[(triton.cdiv(n, rows_per_program),)](
            row_ptr, col_idx, values, weight, n, weight.stride(0), BLOCK_N=rows_per_program
        )
    return weight


def gwq_dequantize_triton(packed: packing.PackedWeight, dtype: torch.dtype = torch.float32, config: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """The dense weight ``dequant(codes) + scatter(outliers)`` computed by the Triton kernels
    of the dense path (compiled on CUDA, interpreted on CPU); equal to
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
    return _dequantize(_identity, kernels_module(interpret), *fields, packed.bits, packed.group_size, packed.in_features, dtype, config)


def _identity(kernel: object) -> object:
    return kernel


def gwq_linear_triton(x: torch.Tensor, *args, path: str = "auto", config: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """GWQ linear ``x @ W.T + bias`` with the fused Triton kernels.

    Args:
        x: activations ``[..., in_features]``, fp16/bf16/fp32, any strides; the output
            has ``x``'s dtype and leading dims.
        args: the rest of ``torch.ops.gwq.linear``'s arguments (:data:`gwq_compile.ops.STORED_SCHEMA`):
            the six tensors of the packed weight (:class:`gwq_compile.packing.PackedWeight`),
            ``bias`` (optional ``[out_features]``, added in fp32 at the store), ``bits``,
            ``group_size`` (-1 means per channel) and ``in_features``.
        path: ``"auto"`` (``M <= 16`` -> split-K, else dense), ``"splitk"``, ``"gemm"``
            (fused tiled kernel) or ``"dense"`` (dequantize, then ``F.linear``).
        config: explicit tile knobs (e.g. ``{"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}``)
            that bypass autotuning; for tests and benchmarks.

    Example:
        >>> import torch
        >>> from gwq_compile import packing
        >>> p = packing.quantize_weight(torch.randn(40, 64), None, bits=4, group_size=32)
        >>> y = gwq_linear_triton(torch.randn(3, 64), *p[:6], None, 4, 32, 64, path="gemm")
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
