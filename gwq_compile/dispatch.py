"""The one place that decides how a GWQ linear runs.

The inputs to the decision are the weight's layout (which follows its device, see
:class:`~gwq_compile.tensor.GWQTensor`), the activation's device, the number of rows M and
the environment variable ``GWQ_KERNEL`` (read at every call, so tests and users can flip it):

================================  ==============================  =========================
weight layout                     ``GWQ_KERNEL`` unset / ``cpu``   ``reference`` / ``triton``
================================  ==============================  =========================
``cpu_int4`` (every CPU weight)   ``torch.ops.gwq.linear_cpu``     plain PyTorch / Triton
                                  (int4 CPU GEMM + CSR outliers)   interpreter, on the stored
                                                                   codes rebuilt at each call
``planes`` on CUDA                Triton (``gwq::linear_triton``)  plain PyTorch / Triton
``planes`` elsewhere              plain PyTorch                    plain PyTorch / Triton
================================  ==============================  =========================

The CPU path runs the compiled kernel (:func:`cpu_kernel`: ``"ext"``) or, with
``GWQ_KERNEL=cpu_aten`` or without a compiler (one warning), the same computation in ATen
ops.  ``GWQ_KERNEL=cpu`` on a weight without the CPU layout, or without the compiled
kernel, is an error, never a quiet fallback.  Within Triton, :func:`triton_family` picks the kernel family from M (the fused
GEMV for ``M <= SMALL_M_MAX``, else dequantize + cuBLAS).  Calls of the CPU fast path are
counted in :data:`CALLS` (tests use it to prove the fast path ran).

Example:
    >>> import torch
    >>> from gwq_compile import GWQTensor, dispatch
    >>> w = GWQTensor.from_float(torch.randn(64, 128), None, bits=4, group_size=64)
    >>> dispatch.path(torch.randn(1, 128), w)
    'cpu_int4'
    >>> dispatch.triton_family(1), dispatch.triton_family(17)
    ('gemv', 'dense')
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import torch

__all__ = ["CALLS", "KERNEL_ENV", "PATHS", "SMALL_M_MAX", "TRITON_FAMILIES", "graph_op", "kernel_choice", "linear", "path", "stored_kernel", "triton_family"]

KERNEL_ENV = "GWQ_KERNEL"
KERNEL_CHOICES = ("", "reference", "triton", "cpu", "cpu_aten")
#: What :func:`path` returns.
PATHS = ("cpu_int4", "triton", "reference")
#: Rows up to which the fused Triton GEMV family is used (decode and small batches).
SMALL_M_MAX = 16
#: Values of the Triton launcher's ``path`` argument.
TRITON_FAMILIES = ("auto", "gemv", "dense")
#: Calls of each fast path actually run (not traced): ``CALLS["cpu_int4"]`` (of which
#: ``"cpu_int4_ext"`` / ``"cpu_int4_aten"`` by kernel).
CALLS: collections.Counter = collections.Counter()


def count(kernel: str) -> None:
    CALLS[kernel] += 1


def check_input(x: torch.Tensor, weight_field: torch.Tensor, in_features: int) -> None:
    """Raise a clear error for an activation no GWQ op can take."""
    if x.shape[-1] != in_features:
        raise ValueError(f"gwq.linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    if x.device != weight_field.device:
        raise ValueError(f"gwq.linear: input is on {x.device} but the quantized weight is on {weight_field.device}")
    if not x.is_floating_point():
        raise TypeError(f"gwq.linear: input must be floating point, got {x.dtype}")


def kernel_choice() -> str:
    """The value of ``GWQ_KERNEL``: ``""`` (the best path), ``reference``, ``triton``, ``cpu`` or ``cpu_aten``."""
    choice = os.environ.get(KERNEL_ENV, "").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of 'reference', 'triton', 'cpu', 'cpu_aten' or unset, got {choice!r}")
    return choice


def path(x: torch.Tensor, weight, choice: Optional[str] = None) -> str:
    """Which of :data:`PATHS` runs ``F.linear(x, weight)`` for a ``GWQTensor`` ``weight``
    (``choice``: ``GWQ_KERNEL`` when already read)."""
    choice = kernel_choice() if choice is None else choice
    if weight.cpu_int4_codes is not None:  # the "cpu_int4" code layout
        return "cpu_int4" if choice in ("", "cpu", "cpu_aten") else choice
    if choice in ("cpu", "cpu_aten"):
        raise ValueError(
            f"{KERNEL_ENV}=cpu: this GWQ weight is in the '{weight.code_layout}' layout on {weight.device}; only CPU "
            "weights have the int4 CPU layout (move the model with .to('cpu'))"
        )
    if choice:
        return choice
    return "triton" if x.is_cuda else "reference"


def cpu_kernel(choice: Optional[str] = None) -> str:
    """How the CPU fast path runs: ``"ext"``, the compiled kernel (:mod:`gwq_compile.cpu_kernel`),
    or ``"aten"``, the same computation in ATen ops (``GWQ_KERNEL=cpu_aten``, or no compiler:
    then with one warning).  ``GWQ_KERNEL=cpu`` insists on the compiled kernel."""
    choice = kernel_choice() if choice is None else choice
    if choice == "cpu_aten":
        return "aten"
    if choice == "cpu" and cpu_kernel_module.reason_unavailable() is not None:
        raise RuntimeError(f"{KERNEL_ENV}=cpu, but the GWQ CPU kernel could not be built: {cpu_kernel_module.reason_unavailable()}")
    return "ext" if cpu_kernel_module.available() else "aten"


def stored_kernel(x: torch.Tensor) -> str:
    """Body of ``torch.ops.gwq.linear`` (stored layout): ``"triton"`` or ``"reference"``."""
    choice = kernel_choice()
    if choice == "triton" or (choice in ("", "cpu") and x.is_cuda):
        return "triton"
    return "reference"


def triton_family(m: int, family: str = "auto") -> str:
    """The Triton kernel family for ``m`` rows: ``"gemv"`` (:mod:`gwq_compile.codegen.gemv`) for
    ``m <= SMALL_M_MAX``, else ``"dense"`` (:mod:`gwq_compile.codegen.dequant`: dequantize to a
    dense weight, then cuBLAS).  A fused tiled GEMM measured 5-30x slower than cuBLAS on an
    H100 at every M >= 64 and was deleted."""
    if family not in TRITON_FAMILIES:
        raise ValueError(f"gwq_linear_triton: path must be one of {TRITON_FAMILIES}, got {family!r}")
    if family != "auto":
        return family
    return "gemv" if m <= SMALL_M_MAX else "dense"


def graph_op(weight) -> tuple[torch._ops.OpOverload, dict[str, torch.Tensor]]:
    """The op a compiled graph calls for ``weight`` (the backend's rewrite pass) and the weight
    tensors it takes after ``x``, by field name: the CPU op for a CPU-layout weight unless
    ``GWQ_KERNEL`` asks for another path at compile time, else the stored-layout op (whose
    body still follows ``GWQ_KERNEL`` at run time)."""
    from gwq_compile import ops  # noqa: PLC0415  (ops imports this module)

    if weight.code_layout == "cpu_int4" and kernel_choice() in ("", "cpu", "cpu_aten"):
        return torch.ops.gwq.linear_cpu.default, dict(zip(ops.CPU_FIELDS, weight.cpu_fields()))
    return torch.ops.gwq.linear.default, dict(zip(ops.STORED_FIELDS, weight.stored_fields()))


#: The attribute of a CPU-layout ``GWQTensor`` caching :func:`eager_kernel_args` (never pickled:
#: ``GWQTensor.__getstate__`` drops it).
EAGER_ARGS_ATTR = "_gwq_eager_kernel_args"


def kernel_args(weight) -> Optional[tuple]:
    """The arguments of ``torch.ops.gwq_cpu.linear`` after ``x`` except the bias, split around
    it (``args[:5]``, bias, ``args[5:]``), for a CPU-layout weight whose groups need no gather;
    None otherwise (plain integer arithmetic on the weight's attributes: torch.compile folds it)."""
    in_features = weight._linear_shape[1]
    ints = cpu_layout.kernel_ints(in_features, weight.group_size, weight.bits)
    if ints is None:
        return None
    tile_group, pad, repeat_k = ints
    codes, grid, _scales, _zeros, row_ptr, col_idx, values = weight.cpu_fields()
    return (codes, grid, row_ptr, col_idx, values, tile_group, in_features, pad, None, repeat_k, cpu_layout.TILE_MIN_ROWS, cpu_layout.gemv_max_rows())


def eager_kernel_args(weight) -> Optional[tuple]:
    """:func:`kernel_args`, computed once per weight: at batch 1 the Python around the kernel
    call costs as much as the GEMV itself, and this is most of it."""
    cached = weight.__dict__.get(EAGER_ARGS_ATTR)
    if cached is None:
        cached = weight.__dict__[EAGER_ARGS_ATTR] = kernel_args(weight) or ()
    return cached or None


def _eager_fast(x: torch.Tensor, weight, bias: Optional[torch.Tensor]):
    """The compiled kernel's plain-function binding with its arguments, when this call is the
    common one: eager inference, ``GWQ_KERNEL`` unset, a CPU weight whose arguments are cached
    (the first call through :func:`linear` caches them), a floating-point CPU x of the right
    width.  Else None, and :func:`linear` takes its general route (which raises the clear errors)."""
    args = weight.__dict__.get(EAGER_ARGS_ATTR)
    if not args or KERNEL_ENV in os.environ or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if not (x.is_cpu and x.is_floating_point() and x.shape[-1] == args[6]):
        return None
    kernel = cpu_kernel_module.eager_linear()
    return None if kernel is None else (kernel, args)


def _run_eager(kernel, x: torch.Tensor, args: tuple, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The compiled kernel's plain-function binding on :func:`kernel_args`' arguments, counted."""
    CALLS["cpu_int4"] += 1
    CALLS["cpu_int4_ext"] += 1
    return kernel(x, *args[:5], bias, *args[5:])


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a ``GWQTensor`` weight, through the op :func:`path` picks
    (for a transposed one, an HF ``Conv1D``'s: ``x @ weight + bias``)."""
    fast = _eager_fast(x, weight, bias)
    if fast is not None:  # batch-1 decode: every microsecond here is ~1% of a token
        return _run_eager(fast[0], x, fast[1], bias)
    choice = kernel_choice()
    chosen = path(x, weight, choice)
    # A plain attribute, not .shape: a subclass's .shape goes through __torch_function__ (~20 us
    # a read on a slow CPU, three reads a call: more than the decode GEMV itself); and the
    # linear's in_features whatever the parameter's orientation (an HF Conv1D's is [in, out]).
    in_features = weight._linear_shape[1]
    attributes = (weight.bits, weight.group_size, in_features)
    if chosen == "cpu_int4":
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if not needs_grad and cpu_kernel(choice) == "ext":
            if not torch.compiler.is_compiling():
                args = eager_kernel_args(weight)
                if args is not None:  # eager inference: the compiled kernel with the fewest Python hops
                    check_input(x, args[0], in_features)
                    return _run_eager(cpu_kernel_module.eager_linear(), x, args, bias)
            else:
                args = kernel_args(weight)
                if args is not None:  # compiled graphs call the compiled kernel itself (no Python at all per call)
                    return torch.ops.gwq_cpu.linear.default(x, *args[:5], bias, *args[5:])
        args = (*weight.cpu_fields(), bias, *attributes)
        if torch.compiler.is_compiling() or needs_grad:
            return torch.ops.gwq.linear_cpu(x, *args)  # the registered op: traceable, with its autograd formula
        return cpu_layout.run(x, args, cpu_kernel(choice))  # eager inference: the op's body, without the dispatcher's Python hops
    if chosen == "reference":
        return torch.nn.functional.linear(x, weight.dequantize_rows(None, x.dtype), bias)  # [out, in] whatever the orientation
    stored = weight.stored_fields()
    if chosen == "triton" and x.is_cuda:
        # A triton_op: Inductor sees the Triton kernels inside compiled graphs.  Other devices
        # keep the opaque op (a triton_op cannot run on the interpreter inside torch.compile).
        return torch.ops.gwq.linear_triton(x, *stored, bias, *attributes)
    return torch.ops.gwq.linear(x, *stored, bias, *attributes)


# Imported last: both import this module (their functions call back into it at run time only).
from gwq_compile import cpu_kernel as cpu_kernel_module  # noqa: E402
from gwq_compile import cpu_layout  # noqa: E402
