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

``GWQ_KERNEL=cpu`` on a weight without the CPU layout is an error, never a quiet
fallback.  Within Triton, :func:`triton_family` picks the kernel family from M (the split-K
GEMV for ``M <= SMALL_M_MAX``, else dequantize + cuBLAS).  Calls of the CPU fast path are
counted in :data:`CALLS` (tests use it to prove the fast path ran).

Example:
    >>> import torch
    >>> from gwq_compile import GWQTensor, dispatch
    >>> w = GWQTensor.from_float(torch.randn(64, 128), None, bits=4, group_size=64)
    >>> dispatch.path(torch.randn(1, 128), w)
    'cpu_int4'
    >>> dispatch.triton_family(1), dispatch.triton_family(17)
    ('splitk', 'dense')
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import torch

__all__ = ["CALLS", "KERNEL_ENV", "PATHS", "SMALL_M_MAX", "TRITON_FAMILIES", "graph_op", "kernel_choice", "linear", "path", "stored_kernel", "triton_family"]

KERNEL_ENV = "GWQ_KERNEL"
KERNEL_CHOICES = ("", "reference", "triton", "cpu")
#: What :func:`path` returns.
PATHS = ("cpu_int4", "triton", "reference")
#: Rows up to which the Triton GEMV / split-K family is used (decode and small batches).
SMALL_M_MAX = 16
#: Values of the Triton launcher's ``path`` argument.
TRITON_FAMILIES = ("auto", "splitk", "gemm", "dense")
#: Calls of each fast path actually run (not traced): ``CALLS["cpu_int4"]``.
CALLS: collections.Counter = collections.Counter()


def count(kernel: str) -> None:
    CALLS[kernel] += 1


def kernel_choice() -> str:
    """The value of ``GWQ_KERNEL``: ``""`` (the best path), ``reference``, ``triton`` or ``cpu``."""
    choice = os.environ.get(KERNEL_ENV, "").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of 'reference', 'triton', 'cpu' or unset, got {choice!r}")
    return choice


def path(x: torch.Tensor, weight) -> str:
    """Which of :data:`PATHS` runs ``F.linear(x, weight)`` for a ``GWQTensor`` ``weight``."""
    choice = kernel_choice()
    if weight.code_layout == "cpu_int4":
        return "cpu_int4" if choice in ("", "cpu") else choice
    if choice == "cpu":
        raise ValueError(
            f"{KERNEL_ENV}=cpu: this GWQ weight is in the '{weight.code_layout}' layout on {weight.device}; only CPU "
            "weights have the int4 CPU layout (move the model with .to('cpu'))"
        )
    if choice:
        return choice
    return "triton" if x.is_cuda else "reference"


def stored_kernel(x: torch.Tensor) -> str:
    """Body of ``torch.ops.gwq.linear`` (stored layout): ``"triton"`` or ``"reference"``."""
    choice = kernel_choice()
    if choice == "triton" or (choice in ("", "cpu") and x.is_cuda):
        return "triton"
    return "reference"


def triton_family(m: int, family: str = "auto") -> str:
    """The Triton kernel family for ``m`` rows: ``"splitk"`` for ``m <= SMALL_M_MAX``, else
    ``"dense"`` (dequantize to a dense weight, then cuBLAS); ``"gemm"``, the fused tiled
    kernel, only when asked for (it measured 5-30x slower than cuBLAS on an H100)."""
    if family not in TRITON_FAMILIES:
        raise ValueError(f"gwq_linear_triton: path must be one of {TRITON_FAMILIES}, got {family!r}")
    if family != "auto":
        return family
    return "splitk" if m <= SMALL_M_MAX else "dense"


def graph_op(weight) -> tuple[torch._ops.OpOverload, dict[str, torch.Tensor]]:
    """The op a compiled graph calls for ``weight`` (the backend's rewrite pass) and the weight
    tensors it takes after ``x``, by field name: the CPU op for a CPU-layout weight unless
    ``GWQ_KERNEL`` asks for another path at compile time, else the stored-layout op (whose
    body still follows ``GWQ_KERNEL`` at run time)."""
    from gwq_compile import ops  # noqa: PLC0415  (ops imports this module)

    if weight.code_layout == "cpu_int4" and kernel_choice() in ("", "cpu"):
        return torch.ops.gwq.linear_cpu.default, dict(zip(ops.CPU_FIELDS, weight.cpu_fields()))
    return torch.ops.gwq.linear.default, dict(zip(ops.STORED_FIELDS, weight.stored_fields()))


def linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a ``GWQTensor`` weight, through the op :func:`path` picks."""
    chosen = path(x, weight)
    attributes = (weight.bits, weight.group_size, weight.in_features)
    if chosen == "cpu_int4":
        return torch.ops.gwq.linear_cpu(x, *weight.cpu_fields(), bias, *attributes)
    if chosen == "reference":
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    stored = weight.stored_fields()
    if chosen == "triton" and x.is_cuda:
        # A triton_op: Inductor sees the Triton kernels inside compiled graphs.  Other devices
        # keep the opaque op (a triton_op cannot run on the interpreter inside torch.compile).
        return torch.ops.gwq.linear_triton(x, *stored, bias, *attributes)
    return torch.ops.gwq.linear(x, *stored, bias, *attributes)
