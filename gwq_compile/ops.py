"""``torch.ops.gwq.linear``: the quantized linear as a registered op.

The op takes the packed fields of a :class:`~gwq_compile.tensor.GWQTensor` (see
:mod:`gwq_compile.packing`) plus the activation, so it is opaque to torch.compile: the
fake implementation gives the output's shape and dtype, and the real one is chosen at
call time from the environment variable ``GWQ_KERNEL``:

* ``reference``: plain PyTorch (dequantize, matmul, add the outliers);
* ``triton``: the fused Triton kernel from ``gwq_compile.codegen`` (on CPU tensors the
  launcher runs an interpreted copy of the kernels: no environment variable needed);
* unset or empty: the best path for the device (Triton on CUDA, the CPU path on CPU).

Example:
    >>> import torch
    >>> from gwq_compile import packing, ops
    >>> p = packing.quantize_weight(torch.randn(16, 40), None, bits=4, group_size=32)
    >>> y = torch.ops.gwq.linear(torch.randn(3, 40), *p[:6], None, p.bits, p.group_size, p.in_features)
    >>> y.shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from gwq_compile import packing

KERNEL_ENV = "GWQ_KERNEL"
KERNEL_CHOICES = ("", "reference", "triton")


def kernel_choice() -> str:
    """The value of ``GWQ_KERNEL`` (read at every call, so tests and users can flip it)."""
    choice = os.environ.get(KERNEL_ENV, "").strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of 'reference', 'triton' or unset, got {choice!r}")
    return choice


def reference_linear(
    x: torch.Tensor,
    packed_codes: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    outlier_row_ptr: torch.Tensor,
    outlier_col_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Plain-PyTorch GWQ linear: the reference every kernel is checked against."""
    p = packing.PackedWeight(
        packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bits, group_size, in_features
    )
    weight = packing.dequantize_weight(p, x.dtype)
    return F.linear(x, weight, bias)


def _check_inputs(x: torch.Tensor, packed_codes: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"gwq.linear: input has {x.shape[-1]} features, the weight expects {in_features}")
    if x.device != packed_codes.device:
        raise ValueError(f"gwq.linear: input is on {x.device} but the quantized weight is on {packed_codes.device}")
    if not x.is_floating_point():
        raise TypeError(f"gwq.linear: input must be floating point, got {x.dtype}")


@torch.library.custom_op("gwq::linear", mutates_args=())
def gwq_linear(
    x: torch.Tensor,
    packed_codes: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    outlier_row_ptr: torch.Tensor,
    outlier_col_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    _check_inputs(x, packed_codes, in_features)
    args = (x, packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, in_features)
    choice = kernel_choice()
    if choice == "triton" or (choice == "" and x.is_cuda):
        from gwq_compile.codegen import launch  # imported lazily: triton is optional on CPU

        return launch.gwq_linear_triton(*args)
    return reference_linear(*args)


@gwq_linear.register_fake
def _(x, packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, in_features):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(*x.shape[:-1], packed_codes.shape[0])


def _setup_context(ctx, inputs, output):
    x, packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(packed_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values)
    ctx.packing = (bits, group_size, in_features)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    # Gradients flow to the activation (and bias) only: the quantized weight is frozen.
    # This is what adapters (LoRA) and chained calibration need.
    bits, group_size, in_features = ctx.packing
    weight = packing.dequantize_weight(packing.PackedWeight(*ctx.saved_tensors, bits, group_size, in_features), ctx.x_dtype)
    grad_x = grad_out @ weight
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, None, None, None, None, grad_bias, None, None, None


gwq_linear.register_autograd(_backward, setup_context=_setup_context)
