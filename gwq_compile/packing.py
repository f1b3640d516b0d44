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

The grid always contains 0 (``min(w_min, 0)``, ``max(w_max, 0)`` as GPTQ does), which is
what makes the zero-code trick above exact.  Outlier entries are left out of each
group's min/max, so one large weight does not stretch the grid of its 63 neighbours.

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

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
OUTLIER_DTYPE = torch.float16
# Smallest positive fp16 subnormal: scales are clamped to it so an all-tiny group never
# gets a zero scale (which would turn every code into a division by zero).
_MIN_SCALE = 2.0**-24


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


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


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


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` with -1 (one group per output row) resolved to ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0 or -1 (per output channel), got {group_size!r}")
    return group_size


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


# ----------------------------------------------------------------------------- group grid


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, G, group_size]``, zero-padding the last partial group."""
    n, k = t.shape
    pad = (-k) % group_size
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.view(n, -1, group_size)


#: Shrink factors tried by the MSE grid search (1.0 = plain min/max).
CLIP_SEARCH_RATIOS = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 ... 0.7


#: Width of a double-quantized scale's code (``double_quant``): ``scale = code * 2**e``, code in [1, 255].
SCALE_CODE_BITS = 8
_SCALE_CODE_MAX = (1 << SCALE_CODE_BITS) - 1
# Row exponents keep code * 2**e an exact fp16 value: 2**-24 is fp16's smallest subnormal,
# and 255 * 2**8 is below fp16's largest finite value.
_SCALE_EXP_MIN, _SCALE_EXP_MAX = -24, 8


def scale_exponents(scale_bound: torch.Tensor) -> torch.Tensor:
    """Per-row exponent ``e`` (int32 ``[N]``) of a double-quantized grid: the smallest with
    ``max(scale_bound) <= 255 * 2**e``, so the row's largest scale gets a code of 128-255."""
    top = scale_bound.float().amax(-1).clamp(min=_MIN_SCALE) / _SCALE_CODE_MAX
    mantissa, exponent = torch.frexp(top)  # top = mantissa * 2**exponent, mantissa in [0.5, 1): exact, unlike ceil(log2)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return exponent.clamp(_SCALE_EXP_MIN, _SCALE_EXP_MAX).to(torch.int32)


def _code_step(exponents: torch.Tensor) -> torch.Tensor:
    """``2**e`` as fp32 ``[N, 1]``: one scale code's step in each row."""
    return torch.exp2(exponents.float()).unsqueeze(-1)


def snap_scales(scale: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """fp32 ``scale`` ``[N, G]`` rounded onto its row's grid ``code * 2**e`` (code in [1, 255])."""
    step = _code_step(exponents)
    return torch.round(scale / step).clamp(1, _SCALE_CODE_MAX) * step


def _store_scale(scale: torch.Tensor, exponents: torch.Tensor | None) -> torch.Tensor:
    """The value a scale is stored as (fp32): fp16, or the double-quantized grid when ``exponents`` are given."""
    scale = scale.clamp(min=_MIN_SCALE)
    return scale.to(SCALE_DTYPE).float() if exponents is None else snap_scales(scale, exponents)


def _range_scale(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """The exact (unrounded) scale of the grid spanning [wmin, wmax]."""
    maxq = (1 << bits) - 1
    return 2 * torch.maximum(wmin.abs(), wmax) / maxq if symmetric else (wmax - wmin) / maxq


def _grid_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool, exponents: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and (integer-valued) zero point of the grid spanning [wmin, wmax] (0 included);
    ``exponents``: the scales are double-quantized (:func:`snap_scales`)."""
    maxq = (1 << bits) - 1
    scale = _store_scale(_range_scale(wmin, wmax, bits, symmetric), exponents)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-wmin / scale).clamp(0, maxq)  # zero from the stored scale
    return scale, zero


CLIP_SEARCH_MODES = ("none", "mse", "act_mse", "mse_wls", "act_wls")
#: Modes that weight the rounding error by each input column's mean squared input.
IMPORTANCE_MODES = ("act_mse", "act_wls")
#: Modes that refit each group's scale and zero by weighted least squares after the range search.
REFIT_MODES = ("mse_wls", "act_wls")
#: Rounds of (round to codes, least-squares refit) after the range search.
WLS_REFIT_ROUNDS = 4


def needs_importance(clip_search: bool | str) -> bool:
    """Whether a ``clip_search`` setting weights the error by the per-column input importance.

    Example:
        >>> needs_importance("act_wls"), needs_importance("mse_wls"), needs_importance(False)
        (True, False, False)
    """
    return clip_search_mode(clip_search) in IMPORTANCE_MODES


def clip_search_mode(clip_search: bool | str) -> str:
    """Normalise a ``clip_search`` setting: ``False``/``"none"``, ``True``/``"mse"``, ``"act_mse"``,
    or ``"mse_wls"``/``"act_wls"`` (the same searches followed by :func:`_refit_wls`).

    Example:
        >>> clip_search_mode(True), clip_search_mode("act_mse")
        ('mse', 'act_mse')
    """
    if clip_search is False or clip_search is None:
        return "none"
    if clip_search is True:
        return "mse"
    if clip_search not in CLIP_SEARCH_MODES:
        raise ValueError(f"clip_search must be one of False, True, {CLIP_SEARCH_MODES}, got {clip_search!r}")
    return clip_search


def _search_range(
    wg: torch.Tensor, wmin: torch.Tensor, wmax: torch.Tensor, bits: int, symmetric: bool, weights: torch.Tensor,
    exponents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group grid minimising ``sum weights * (dequant - w)^2`` over shrunk ranges.

    Coordinate search over :data:`CLIP_SEARCH_RATIOS` (39 grids, not 13 x 13): first one
    factor for both ends, then (asymmetric grids) the top end with the bottom fixed, then
    the bottom end with the top fixed.  Factor 1.0 (plain min/max) is always a candidate,
    so the weighted error never exceeds min/max's.
    """
    maxq = (1 << bits) - 1

    def error(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, z = _grid_from_range(wmin * lo, wmax * hi, bits, symmetric, exponents)
        q = (torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, maxq)
        err = (((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - wg).square() * weights).sum(-1)  # outliers/padding: 0 -> exact
        return err, s, z

    one = torch.ones_like(wmin)
    lo, hi = one, one
    best, scale, zero = error(lo, hi)

    def consider(new_lo: torch.Tensor, new_hi: torch.Tensor) -> None:
        nonlocal best, scale, zero, lo, hi
        err, s, z = error(new_lo, new_hi)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        lo, hi = torch.where(better, new_lo, lo), torch.where(better, new_hi, hi)

    for r in CLIP_SEARCH_RATIOS[1:]:
        consider(one * r, one * r)
    if not symmetric:
        for r in CLIP_SEARCH_RATIOS:
            consider(lo, one * r)
        for r in CLIP_SEARCH_RATIOS:
            consider(one * r, hi)
    return scale, zero


def _grid_error(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, weights: torch.Tensor) -> torch.Tensor:
    """``sum weights * (dequant(round(w)) - w)^2`` per group, for fp32 scales ``s`` and integer-valued zeros ``z``."""
    maxq = (1 << bits) - 1
    q = (torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, maxq)
    return (((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - wg).square() * weights).sum(-1)


def _refit_wls(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool, weights: torch.Tensor,
    rounds: int = WLS_REFIT_ROUNDS, exponents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares refit of each group's grid, with the codes held fixed (llama.cpp's ``make_qkx`` idea).

    Each round rounds the group onto its current grid, fits ``w ~ a * q + b`` by weighted
    least squares over those codes (``weights``: 0 for outliers and padding), takes the
    integer zero ``z = round(-b / a)`` (asymmetric grids; symmetric ones keep theirs) and
    then the best scale for that zero, ``s = sum w (q - z) x / sum w (q - z)^2``, stored in
    fp16.  A group takes the new grid only where its weighted error (codes rounded again)
    goes down, so the result is never worse than the search's.  Only the values of
    scales and zeros change: the stored format is the same.
    """
    maxq = (1 << bits) - 1
    best = _grid_error(wg, scale, zero, bits, weights)
    sw = weights.expand_as(wg).sum(-1)
    for _ in range(rounds):
        q = (torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, maxq)
        if symmetric:
            z = zero
        else:
            swq, swx = (weights * q).sum(-1), (weights * wg).sum(-1)
            swqq, swqx = (weights * q * q).sum(-1), (weights * q * wg).sum(-1)
            det = sw * swqq - swq * swq
            a = (sw * swqx - swq * swx) / det.clamp(min=1e-30)
            b = (swx - a * swq) / sw.clamp(min=1e-30)
            ok = (det > 1e-12 * sw * sw.clamp(min=1)) & (a > 0)
            z = torch.where(ok, torch.round(-b / a.clamp(min=1e-30)).clamp(0, maxq), zero)
        d = q - z.unsqueeze(-1)
        den = (weights * d * d).sum(-1)
        s = (weights * d * wg).sum(-1) / den.clamp(min=1e-30)
        s = _store_scale(torch.where((den > 0) & (s > 0), s, scale), exponents)
        err = _grid_error(wg, s, z, bits, weights)
        better = err < best
        if not better.any():
            break
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def compute_group_qparams(
    weight: torch.Tensor,
    outlier_mask: torch.Tensor | None,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    clip_search: bool | str = False,
    importance: torch.Tensor | None = None,
    double_quant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales (fp16 ``[N, G]``) and integer zero points (uint8 ``[N, G]``).

    ``double_quant``: every scale lies on its row's 8-bit grid ``code * 2**e`` (module doc),
    the exponent fixed from the plain min/max scales before any search (a search only
    shrinks ranges), and every candidate of the search is rounded onto it, so the search
    sees the error of the grid that is stored.

    Outliers are excluded from each group's range (they are replaced by 0, which is in
    the range anyway).  The padding of a partial last group is 0 too, so it never widens
    the range either.  ``clip_search`` (see :func:`clip_search_mode`) shrinks each
    group's range to the candidate of :func:`_search_range` with the smallest squared
    rounding error: unweighted (``"mse"``, as GPTQ/llama.cpp do), or weighted per input
    column by ``importance`` ``[K]`` (``"act_mse"``: the mean squared layer input, so
    the error is the layer's expected output error under a diagonal approximation, as
    llama.cpp's imatrix does).  ``"mse_wls"``/``"act_wls"`` follow the same searches with a
    weighted least-squares refit of scale and zero (:func:`_refit_wls`).  Rounding stays
    round-to-nearest.
    """
    check_bits(bits)
    mode = clip_search_mode(clip_search)
    g = effective_group_size(weight.shape[1], group_size)
    w = weight.float()
    if outlier_mask is not None:
        w = w.masked_fill(outlier_mask, 0.0)
    wg = _grouped(w, g)
    wmin = wg.amin(-1).clamp(max=0.0)
    wmax = wg.amax(-1).clamp(min=0.0)
    exponents = scale_exponents(_range_scale(wmin, wmax, bits, symmetric)) if double_quant else None
    if mode == "none":
        scale, zero = _grid_from_range(wmin, wmax, bits, symmetric, exponents)
    else:
        if mode in IMPORTANCE_MODES:
            if importance is None or importance.shape != (weight.shape[1],):
                got = None if importance is None else tuple(importance.shape)
                raise ValueError(f"clip_search={mode!r} needs importance of shape ({weight.shape[1]},) (mean squared input per column), got {got}")
            if not torch.isfinite(importance).all() or (importance < 0).any():
                raise ValueError(f"clip_search={mode!r}: importance must be finite and non-negative")
            weights = _grouped(importance.float().to(w.device).unsqueeze(0), g)
        else:
            weights = torch.ones(1, 1, 1, device=w.device)
        scale, zero = _search_range(wg, wmin, wmax, bits, symmetric, weights, exponents)
        if mode in REFIT_MODES:
            # Outliers and padding sit exactly on every grid (code = zero): leave them out of the fit.
            keep = torch.ones(w.shape, dtype=torch.bool, device=w.device) if outlier_mask is None else ~outlier_mask
            refit_weights = weights * _grouped(keep.float(), g)
            scale, zero = _refit_wls(wg, scale, zero, bits, symmetric, refit_weights, exponents=exponents)
    return scale.to(SCALE_DTYPE), zero.to(torch.uint8)


def quantize_to_codes(
    weight: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    bits: int,
    group_size: int,
    outlier_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``weight`` onto the given grid: uint8 codes ``[N, K]``; outliers get the zero code."""
    n, k = weight.shape
    g = effective_group_size(k, group_size)
    maxq = (1 << bits) - 1
    wg = _grouped(weight.float(), g)
    q = torch.round(wg / group_scales.float().unsqueeze(-1)) + group_zeros.float().unsqueeze(-1)
    codes = q.clamp(0, maxq).to(torch.uint8).view(n, -1)[:, :k]
    if outlier_mask is not None:
        zero_codes = group_zeros.repeat_interleave(g, dim=1)[:, :k]
        codes = torch.where(outlier_mask, zero_codes, codes)
    return codes.contiguous()


def dequantize_codes(
    codes: torch.Tensor,
    group_scales: torch.Tensor,
    group_zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(code - zero) * scale`` per group: ``[N, K]`` in ``dtype`` (computed in fp32)."""
    n, k = codes.shape
    g = effective_group_size(k, group_size)
    cg = _grouped(codes, g).float()
    w = (cg - group_zeros.float().unsqueeze(-1)) * group_scales.float().unsqueeze(-1)
    return w.view(n, -1)[:, :k].to(dtype)


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, clip_search: bool | str = False, importance: torch.Tensor | None = None,
    double_quant: bool = False,
) -> torch.Tensor:
    """Round ``weight`` onto its own grid (:func:`compute_group_qparams`, no outliers) and back:
    fp32 ``[N, K]``, no packing (searches run it many times).

    Example:
        >>> fake_quantize(torch.randn(4, 64), bits=4, group_size=32).shape
        torch.Size([4, 64])
    """
    scales, zeros = compute_group_qparams(weight, None, bits, group_size, symmetric, clip_search, importance, double_quant)
    return dequantize_codes(quantize_to_codes(weight, scales, zeros, bits, group_size), scales, zeros, group_size)


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
    codes = scales / _code_step(exponents)
    if not bool(((codes == codes.round()) & (codes >= 1) & (codes <= _SCALE_CODE_MAX)).all()):
        raise ValueError("double_quant: group scales are not on their rows' 8-bit power-of-two grid (quantized without double_quant?)")
    if group_zeros.numel() and int(group_zeros.max()) >= (1 << bits):
        raise ValueError(f"double_quant: a zero point does not fit in {bits} bits")
    stored_scales = torch.cat([(exponents + _EXPONENT_BIAS).to(torch.uint8).unsqueeze(-1), codes.to(torch.uint8)], dim=1)
    return stored_scales, pack_codes(group_zeros.contiguous(), bits)


def decode_grid(stored_scales: torch.Tensor, stored_zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and uint8 zeros ``[N, G]`` of a stored double-quantized grid (:func:`encode_grid`)."""
    if stored_scales.dtype != torch.uint8 or stored_scales.dim() != 2 or stored_scales.shape[1] < 2:
        raise ValueError(f"double_quant: stored scales must be uint8 [N, 1 + G], got {stored_scales.dtype} {tuple(stored_scales.shape)}")
    step = _code_step(stored_scales[:, 0].int() - _EXPONENT_BIAS)
    scales = (stored_scales[:, 1:].float() * step).to(SCALE_DTYPE)
    return scales, unpack_codes(stored_zeros, bits, scales.shape[1])
