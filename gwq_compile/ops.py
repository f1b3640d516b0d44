"""The registered GWQ linear ops; every op's argument list is written once, here.

A GWQ linear is ``x @ W.T + bias`` with ``W`` in one of two layouts (see
:class:`~gwq_compile.tensor.GWQTensor`), and each layout has its op:

* ``torch.ops.gwq.linear(x, <STORED_FIELDS>, bias, bits, group_size, in_features)``: the
  stored bit-plane layout of :mod:`gwq_compile.packing`.  Its body runs the plain-PyTorch
  reference or the Triton kernels (:func:`gwq_compile.dispatch.stored_kernel` says which);
  ``torch.ops.gwq.linear_triton`` (:mod:`gwq_compile.codegen.launch`) is the same schema as a
  ``triton_op``, so Inductor sees the kernels on CUDA.
* ``torch.ops.gwq.linear_cpu(x, <CPU_FIELDS>, bias, bits, group_size, in_features)``: the CPU
  runtime layout of :mod:`gwq_compile.cpu_layout` (torch's int4 CPU GEMM plus the CSR outliers).

Which op a call takes is decided in one place, :mod:`gwq_compile.dispatch`.  Both ops are
opaque to torch.compile (fake implementations give the output's shape and dtype) and have
the same autograd: gradients flow to ``x`` and ``bias``, the quantized weight is frozen
(what LoRA adapters and chained calibration need).

Example:
    >>> import torch
    >>> from gwq_compile import packing, ops
    >>> p = packing.quantize_weight(torch.randn(16, 40), None, bits=4, group_size=32)
    >>> y = torch.ops.gwq.linear(torch.randn(3, 40), *p[:6], None, p.bits, p.group_size, p.in_features)
    >>> y.shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from gwq_compile import cpu_layout, dispatch, grid, packing

#: The stored group grid and CSR outliers, which every layout keeps as they are.
GRID_FIELDS = packing.PackedWeight._fields[1:6]
#: Tensor fields of the stored layout, in op-argument order (``PackedWeight``'s first six).
STORED_FIELDS = ("packed_codes", *GRID_FIELDS)
#: Tensor fields of the CPU runtime layout, in op-argument order.
CPU_FIELDS = ("cpu_int4_codes", "cpu_scales_zeros", *GRID_FIELDS)
#: Integer attributes every GWQ linear op takes after ``bias``.
ATTRIBUTES = ("bits", "group_size", "in_features")


def schema(fields: tuple[str, ...]) -> str:
    """The op schema ``(Tensor x, <fields>, Tensor? bias, int bits, int group_size, int in_features) -> Tensor``."""
    tensors = ", ".join(f"Tensor {f}" for f in fields)
    ints = ", ".join(f"int {a}" for a in ATTRIBUTES)
    return f"(Tensor x, {tensors}, Tensor? bias, {ints}) -> Tensor"


def signature(fields: tuple[str, ...]) -> inspect.Signature:
    """:func:`schema` as a Python signature, for APIs that infer the schema from one (``triton_op``)."""
    P = inspect.Parameter
    params = [P("x", P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)]
    params += [P(f, P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor) for f in fields]
    params += [P("bias", P.POSITIONAL_OR_KEYWORD, annotation=Optional[torch.Tensor])]
    params += [P(a, P.POSITIONAL_OR_KEYWORD, annotation=int) for a in ATTRIBUTES]
    return inspect.Signature(params, return_annotation=torch.Tensor)


STORED_SCHEMA = schema(STORED_FIELDS)
CPU_SCHEMA = schema(CPU_FIELDS)


def reference_linear(x: torch.Tensor, *args) -> torch.Tensor:
    """Plain-PyTorch GWQ linear on the stored layout (dequantize, matmul, outliers included):
    the reference every kernel is checked against.  ``args``: :data:`STORED_SCHEMA` after ``x``."""
    fields, bias, (bits, group_size, in_features) = args[:6], args[6], args[7:]
    weight = packing.dequantize_weight(packing.PackedWeight(*fields, bits, group_size, in_features), x.dtype)
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- registration

_LIB = torch.library.Library("gwq", "FRAGMENT")  # noqa: TOR901 (plain define/impl: a few us less per call than custom_op)
_LIB.define("linear" + STORED_SCHEMA)
_LIB.define("linear_cpu" + CPU_SCHEMA)
# Dense rows of a weight in either layout (all rows for rows=None): dequantize(), embedding
# lookups and the linear ops' backward.  Opaque, so compiled graphs never trace the CPU
# layout's index maps or the data-dependent CSR gathers.
_LIB.define(
    "dequantize(Tensor? packed_codes, Tensor? cpu_int4_codes, "
    + ", ".join(f"Tensor {f}" for f in GRID_FIELDS)
    + ", Tensor? rows, int bits, int group_size, int in_features, ScalarType dtype) -> Tensor"
)
# The stored bit-plane codes of a CPU-layout weight (exact): saving, and the paths that read
# the stored layout (GWQ_KERNEL=triton/reference on CPU weights), eagerly or compiled.
_LIB.define("unpack_cpu_codes(Tensor cpu_int4_codes, int bits, int group_size, int in_features, int out_features) -> Tensor")


def _stored_linear(x: torch.Tensor, *args) -> torch.Tensor:
    dispatch.check_input(x, args[0], args[-1])
    if dispatch.stored_kernel(x) == "triton":
        from gwq_compile.codegen import launch  # noqa: PLC0415  (triton is optional on CPU)

        return launch.gwq_linear_triton(x, *args)
    return reference_linear(x, *args)


def dequantize_rows(packed_codes, cpu_int4_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, rows, bits, group_size, in_features, dtype):
    """Body of ``torch.ops.gwq.dequantize``: dense fp32 rows from the exact stored grid, cast to ``dtype``."""
    n = outlier_row_ptr.numel() - 1
    if rows is not None:
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"GWQ embedding lookup: indices must be integers, got {rows.dtype}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
            bad = int(rows.min()) if int(rows.min()) < 0 else int(rows.max())
            raise IndexError(f"GWQ embedding lookup: token id {bad} is out of range for a vocabulary of {n}")
        rows = rows.long()
        group_scales, group_zeros = group_scales[rows], group_zeros[rows]
    if cpu_int4_codes is not None:
        codes = cpu_layout.unpack_rows(cpu_int4_codes, bits, group_size, in_features, rows)
        codes = codes if rows is not None else codes[:n]
    else:
        codes = packing.unpack_codes(packed_codes if rows is None else packed_codes[rows], bits, in_features)
    w = grid.dequantize_codes(codes, group_scales, group_zeros, group_size, torch.float32)
    if outlier_values.numel():
        packing.add_csr_rows(w, outlier_row_ptr, outlier_col_idx, outlier_values, rows)
    return w.to(dtype).contiguous()  # (a partial last group leaves a strided view) the fake promises a contiguous tensor


def _fake_dequantize(packed_codes, cpu_int4_codes, group_scales, group_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, rows, bits, group_size, in_features, dtype):
    n = rows.numel() if rows is not None else outlier_row_ptr.shape[0] - 1
    return group_scales.new_empty(n, in_features, dtype=dtype)


def _fake_stored(x: torch.Tensor, *args) -> torch.Tensor:
    torch._check(x.shape[-1] == args[-1])
    return x.new_empty(*x.shape[:-1], args[0].shape[0])


def _fake_cpu(x: torch.Tensor, *args) -> torch.Tensor:
    torch._check(x.shape[-1] == args[-1])
    return x.new_empty(*x.shape[:-1], args[2].shape[0])  # group_scales is [N, G]


torch.library.impl("gwq::linear", "CompositeExplicitAutograd", lib=_LIB)(_stored_linear)
torch.library.impl("gwq::linear_cpu", "CompositeExplicitAutograd", lib=_LIB)(cpu_layout.linear_op)
torch.library.register_fake("gwq::linear", lib=_LIB)(_fake_stored)
torch.library.register_fake("gwq::linear_cpu", lib=_LIB)(_fake_cpu)
torch.library.impl("gwq::dequantize", "CompositeExplicitAutograd", lib=_LIB)(dequantize_rows)
torch.library.register_fake("gwq::dequantize", lib=_LIB)(_fake_dequantize)
torch.library.impl("gwq::unpack_cpu_codes", "CompositeExplicitAutograd", lib=_LIB)(cpu_layout.unpack_codes)


@torch.library.register_fake("gwq::unpack_cpu_codes", lib=_LIB)
def _(cpu_int4_codes, bits, group_size, in_features, out_features):
    return cpu_int4_codes.new_empty(out_features, packing.packed_row_bytes(in_features, bits))


# ----------------------------------------------------------------------------- autograd (shared)


def _setup_context(layout: str):
    def setup_context(ctx, inputs, output) -> None:
        x, *fields, bias, bits, group_size, in_features = inputs
        ctx.save_for_backward(*fields)
        ctx.layout = layout
        ctx.attributes = (bits, group_size, in_features)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None

    return setup_context


def backward(ctx, grad_out: torch.Tensor):
    fields = ctx.saved_tensors
    codes = (fields[0], None) if ctx.layout == "planes" else (None, fields[0])
    weight = torch.ops.gwq.dequantize(*codes, *fields[-len(GRID_FIELDS):], None, *ctx.attributes, ctx.x_dtype)
    grad_x = grad_out @ weight
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
    return (grad_x, *([None] * len(fields)), grad_bias, None, None, None)


#: ``setup_context`` for ops on the stored layout (``gwq::linear`` and ``gwq::linear_triton``).
setup_stored_context = _setup_context("planes")
torch.library.register_autograd("gwq::linear", backward, setup_context=setup_stored_context, lib=_LIB)
torch.library.register_autograd("gwq::linear_cpu", backward, setup_context=_setup_context("cpu_int4"), lib=_LIB)
