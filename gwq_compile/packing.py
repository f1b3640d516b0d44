"""The GWQ packed weight format: the one source of truth.

Every other piece (the tensor subclass, the reference op, the Triton kernels'
references, serialization and the tests) calls these functions; nothing else
knows how codes are laid out.

A linear weight ``W`` of shape ``[N, K]`` (``out_features, in_features``) is stored as

* ``packed_codes`` uint8 ``[N, packed_row_bytes(K, bits)]``: the b-bit integer codes,
  split into *bit planes* whose widths are powers of two (8 -> [8], 4 -> [4],
  3 -> [2, 1], 2 -> [2]).  Each plane is packed densely along K, little-endian inside a
  byte: code ``k`` of a ``w``-bit plane sits in byte ``k // (8 // w)`` of that plane at bit
  offset ``(k % (8 // w)) * w``.  Planes follow each other inside a row, lowest bits
  first.  So 3-bit codes cost exactly 3 bits (plus at most one byte of row padding per
  plane), and every plane is unpacked with one shift and one mask: cheap in a kernel.
* ``group_scales`` fp16 ``[N, G]`` and ``group_zeros`` uint8 ``[N, G]`` with
  ``G = ceil(K / group_size)``: the last group may be partial (K need not be a multiple of
  the group size).  Dequantization is ``(code - zero) * scale``.
* outliers in CSR: ``outlier_row_ptr`` int32 ``[N + 1]``, ``outlier_col_idx`` int16
  (int32 when K > 32767) ``[nnz]`` sorted by column inside each row, ``outlier_values``
  fp16 ``[nnz]``.  At an outlier position the stored code equals the group's zero point,
  so the dense part dequantizes to exactly 0 there and ``W = dequant(codes) + scatter(outliers)``
  holds without masking: kernels add the outliers' contribution, they never subtract.
* ``double_quant`` (bitsandbytes' name for the idea; k-quants do the same with 6-bit scales):
  every group scale of a row is ``code * 2**e`` with an 8-bit ``code`` in [1, 255] and one
  exponent ``e`` per row, and every zero needs only ``bits`` bits.  A checkpoint then
  stores the scales as uint8 ``[N, 1 + G]`` (the row's exponent, then its codes) and the
  zeros packed at ``bits`` bits (:func:`encode_grid`), ``8 + bits`` bits a group instead of 24, so groups
  of 32 cost what groups of 64 cost in fp16.  In memory the grid is decoded back to the
  fp16 scales and uint8 zeros above (exactly: ``code * 2**e`` is an fp16 value), which is
  what every kernel reads; the runtime copy is counted as resident bytes.

The grid itself (each group's scale and zero, and rounding onto it) is chosen by the stage
before this one, :mod:`gwq_compile.grid`; it always contains 0, which is what makes the
zero-code trick above exact.

Example:
    >>> import torch
    >>> from gwq_compile import packing
    >>> w = torch.randn(8, 100)
    >>> mask = torch.zeros_like(w, dtype=torch.bool); mask[0, 3] = True
    >>> p = packing.quantize_weight(w, mask, bits=3, group_size=32)
    >>> packing.dequantize_weight(p).shape
    torch.Size([8, 100])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gwq_compile.grid import (  # the grid stage's names this format is built on
    SCALE_CODE_BITS,
    SCALE_CODE_MAX,
    SCALE_DTYPE,
    SUPPORTED_BITS,
    check_bits,
    compute_group_qparams,
    dequantize_codes,
    effective_group_size,
    quantize_to_codes,
    scale_code_step,
    scale_exponents,
)

OUTLIER_DTYPE = torch.float16


class PackedWeight(NamedTuple):
    """All tensors of one packed weight, in the field order used everywhere.

    Shapes: packed_codes uint8 [N, row_bytes]; group_scales fp16 [N, G];
    group_zeros uint8 [N, G]; outlier_row_ptr int32 [N+1]; outlier_col_idx int16/int32 [nnz];
    outlier_values fp16 [nnz].  ``in_features`` is K, ``group_size`` the effective
    (positive) group size.
    """

    packed_codes: torch.Tensor
    group_scales: torch.Tensor
    group_zeros: torch.Tensor
    outlier_row_ptr: torch.Tensor
    outlier_col_idx: torch.Tensor
    outlier_values: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    double_quant: bool = False  # scales on a per-row 8-bit power-of-two grid (module doc)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes a ``bits``-bit code is split into (lowest bits first)."""
    check_bits(bits)
    return {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}[bits]


def plane_row_bytes(in_features: int, width: int) -> int:
    """Bytes one row of a ``width``-bit plane takes for ``in_features`` codes."""
    return math.ceil(in_features * width / 8)


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of ``packed_codes`` per output row."""
    return sum(plane_row_bytes(in_features, w) for w in plane_widths(bits))


def plane_offsets(in_features: int, bits: int) -> tuple[int, ...]:
    """Byte offset of each plane inside a packed row."""
    offsets, acc = [], 0
    for w in plane_widths(bits):
        offsets.append(acc)
        acc += plane_row_bytes(in_features, w)
    return tuple(offsets)


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group_size(in_features, group_size))


# ----------------------------------------------------------------------------- bit packing


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[N, K]`` (values < 2**bits) into ``[N, packed_row_bytes(K, bits)]``."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    n, k = codes.shape
    planes, shift = [], 0
    for width in plane_widths(bits):
        per_byte = 8 // width
        plane = (codes >> shift) & ((1 << width) - 1)
        pad = (-k) % per_byte
        if pad:
            plane = torch.nn.functional.pad(plane, (0, pad))
        plane = plane.view(n, -1, per_byte).to(torch.int32)
        weights = torch.tensor([1 << (width * i) for i in range(per_byte)], dtype=torch.int32, device=codes.device)
        planes.append((plane * weights).sum(-1).to(torch.uint8))
        shift += width
    return torch.cat(planes, dim=1).contiguous()


def unpack_codes(packed_codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[N, row_bytes]`` -> uint8 codes ``[N, K]``."""
    n, row_bytes = packed_codes.shape
    if row_bytes != packed_row_bytes(in_features, bits):
        raise ValueError(
            f"packed_codes has {row_bytes} bytes per row, expected {packed_row_bytes(in_features, bits)} "
            f"for in_features={in_features}, bits={bits}"
        )
    codes = torch.zeros(n, in_features, dtype=torch.uint8, device=packed_codes.device)
    shift = 0
    for width, offset in zip(plane_widths(bits), plane_offsets(in_features, bits)):
        per_byte = 8 // width
        nbytes = plane_row_bytes(in_features, width)
        plane = packed_codes[:, offset : offset + nbytes]
        shifts = torch.arange(per_byte, device=packed_codes.device, dtype=torch.uint8) * width
        vals = (plane.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        codes |= vals.reshape(n, -1)[:, :in_features] << shift
        shift += width
    return codes


# ----------------------------------------------------------------------------- outliers (CSR)


def outliers_to_csr(weight: torch.Tensor, outlier_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked entries of ``weight`` as CSR: (row_ptr int32, col_idx int16/int32, values fp16)."""
    n, k = weight.shape
    rows, cols = outlier_mask.nonzero(as_tuple=True)  # row-major order: sorted by (row, col)
    counts = torch.bincount(rows, minlength=n)
    row_ptr = torch.zeros(n + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    index_dtype = torch.int16 if k <= torch.iinfo(torch.int16).max else torch.int32
    values = weight[rows, cols]
    if values.numel() and values.abs().max() > torch.finfo(OUTLIER_DTYPE).max:
        raise ValueError("an outlier weight exceeds the fp16 range and cannot be stored as an fp16 outlier")
    return row_ptr, cols.to(index_dtype), values.to(OUTLIER_DTYPE)


def csr_rows(outlier_row_ptr: torch.Tensor, nnz: int | None = None) -> torch.Tensor:
    """Row index of every CSR entry (int64 ``[nnz]``).

    Pass ``nnz`` (the number of outliers) whenever it is known: with it the output size is
    static, which lets fake tensors trace the op's backward under torch.compile.
    """
    counts = outlier_row_ptr[1:].long() - outlier_row_ptr[:-1].long()
    rows = torch.arange(counts.numel(), device=outlier_row_ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def csr_to_dense(
    outlier_row_ptr: torch.Tensor,
    outlier_col_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    dense = torch.zeros(shape, dtype=dtype, device=outlier_values.device)
    dense[csr_rows(outlier_row_ptr, outlier_values.numel()), outlier_col_idx.long()] = outlier_values.to(dtype)
    return dense


def csr_to_mask(outlier_row_ptr: torch.Tensor, outlier_col_idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool, device=outlier_col_idx.device)
    mask[csr_rows(outlier_row_ptr, outlier_col_idx.numel()), outlier_col_idx.long()] = True
    return mask


# ----------------------------------------------------------------------------- whole weight


def quantize_weight(
    weight: torch.Tensor,
    outlier_mask: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_search: bool | str = False,
    group_scales: torch.Tensor | None = None,
    group_zeros: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    double_quant: bool = False,
) -> PackedWeight:
    """Quantize a dense ``[N, K]`` weight into the packed GWQ format (``double_quant``: module doc).

    ``group_scales``/``group_zeros``/``codes`` may be given by an algorithm that chose them
    itself (GPTQ-style error compensation); otherwise they are round-to-nearest on the
    grid of :func:`compute_group_qparams` (``clip_search``, ``importance``).
    """
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = effective_group_size(k, group_size)
    if outlier_mask is None:
        outlier_mask = torch.zeros(n, k, dtype=torch.bool, device=weight.device)
    if group_scales is None or group_zeros is None:
        group_scales, group_zeros = compute_group_qparams(weight, outlier_mask, bits, g, symmetric, clip_search, importance, double_quant)
    elif double_quant:
        encode_grid(group_scales, group_zeros, bits)  # an algorithm's own grid must be on the stored one: raises if not
    if codes is None:
        codes = quantize_to_codes(weight, group_scales, group_zeros, bits, g, outlier_mask)
    else:
        zero_codes = group_zeros.repeat_interleave(g, dim=1)[:, :k]
        codes = torch.where(outlier_mask, zero_codes, codes.to(torch.uint8))
    row_ptr, col_idx, values = outliers_to_csr(weight, outlier_mask)
    return PackedWeight(
        pack_codes(codes, bits), group_scales.contiguous(), group_zeros.contiguous(), row_ptr, col_idx, values, bits, g, k, double_quant
    )


def dequantize_weight(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight: dequantized codes plus the scattered fp16 outliers."""
    codes = unpack_codes(packed.packed_codes, packed.bits, packed.in_features)
    w = dequantize_codes(codes, packed.group_scales, packed.group_zeros, packed.group_size, torch.float32)
    add_csr_rows(w, packed.outlier_row_ptr, packed.outlier_col_idx, packed.outlier_values)
    return w.to(dtype)


def add_csr_rows(
    w: torch.Tensor, outlier_row_ptr: torch.Tensor, outlier_col_idx: torch.Tensor, outlier_values: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Add the outliers of ``rows`` (all rows for ``None``) into ``w`` ``[len(rows), K]``, in place."""
    if rows is None:
        out_rows, entries = csr_rows(outlier_row_ptr, outlier_values.numel()), slice(None)
    else:
        rows = rows.long()
        starts, ends = outlier_row_ptr[rows].long(), outlier_row_ptr[rows + 1].long()
        counts = ends - starts
        out_rows = torch.repeat_interleave(torch.arange(rows.numel(), device=w.device), counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        entries = torch.repeat_interleave(starts, counts) + torch.arange(out_rows.numel(), device=w.device) - first
    w[out_rows, outlier_col_idx[entries].long()] += outlier_values[entries].to(w.dtype)
    return w


def storage_bits_of(
    out_features: int, in_features: int, bits: int, group_size: int, outliers: int, index_bytes: int, double_quant: bool = False
) -> dict[str, int]:
    """Bits the stored format takes, by component, from the sizes alone (what the report counts).

    ``double_quant``: the scales as uint8 codes plus one int8 exponent per row, and the zeros
    packed at ``bits`` bits (:func:`encode_grid`)."""
    n_groups = num_groups(in_features, group_size)
    groups = out_features * n_groups
    if double_quant:
        scales = groups * SCALE_CODE_BITS + out_features * 8  # codes + one exponent byte a row
        zeros = out_features * packed_row_bytes(n_groups, bits) * 8
    else:
        scales, zeros = groups * SCALE_DTYPE.itemsize * 8, groups * 8
    return {
        "codes": out_features * packed_row_bytes(in_features, bits) * 8,
        "scales": scales,
        "zeros": zeros,
        "outlier_values": outliers * OUTLIER_DTYPE.itemsize * 8,
        "outlier_indices": outliers * index_bytes * 8 + (out_features + 1) * 32,
    }


def storage_bits(packed: PackedWeight) -> dict[str, int]:
    """Bits actually stored, by component (what the report counts)."""
    n = packed.packed_codes.shape[0]
    return storage_bits_of(
        n, packed.in_features, packed.bits, packed.group_size, packed.outlier_values.numel(), packed.outlier_col_idx.element_size(), packed.double_quant
    )


# ----------------------------------------------------------------------------- double-quantized grid in a checkpoint

#: Bias of the row exponent in the first byte of a stored double-quantized scale row.
_EXPONENT_BIAS = 128


def encode_grid(group_scales: torch.Tensor, group_zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of a double-quantized grid: (scales uint8 ``[N, 1 + G]``: the row exponent
    plus 128, then the G scale codes; zeros packed at ``bits`` bits, ``pack_codes`` layout).

    Raises ``ValueError`` when a scale is not ``code * 2**e`` on its row's grid or a zero does
    not fit in ``bits`` bits (the weight was not quantized with ``double_quant``).  Exact:
    :func:`decode_grid` gives the same tensors back.
    """
    scales = group_scales.float()
    exponents = scale_exponents(scales)
    codes = scales / scale_code_step(exponents)
    if not bool(((codes == codes.round()) & (codes >= 1) & (codes <= SCALE_CODE_MAX)).all()):
        raise ValueError("double_quant: group scales are not on their rows' 8-bit power-of-two grid (quantized without double_quant?)")
    if group_zeros.numel() and int(group_zeros.max()) >= (1 << bits):
        raise ValueError(f"double_quant: a zero point does not fit in {bits} bits")
    stored_scales = torch.cat([(exponents + _EXPONENT_BIAS).to(torch.uint8).unsqueeze(-1), codes.to(torch.uint8)], dim=1)
    return stored_scales, pack_codes(group_zeros.contiguous(), bits)


def decode_grid(stored_scales: torch.Tensor, stored_zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and uint8 zeros ``[N, G]`` of a stored double-quantized grid (:func:`encode_grid`)."""
    if stored_scales.dtype != torch.uint8 or stored_scales.dim() != 2 or stored_scales.shape[1] < 2:
        raise ValueError(f"double_quant: stored scales must be uint8 [N, 1 + G], got {stored_scales.dtype} {tuple(stored_scales.shape)}")
    step = scale_code_step(stored_scales[:, 0].int() - _EXPONENT_BIAS)
    scales = (stored_scales[:, 1:].float() * step).to(SCALE_DTYPE)
    return scales, unpack_codes(stored_zeros, bits, scales.shape[1])
