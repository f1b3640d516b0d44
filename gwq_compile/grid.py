"""The grid stage: each group's scale and zero point, and rounding onto them.

``compute_group_qparams`` chooses the grid of every group of a ``[N, K]`` weight (plain
min/max, or a search that shrinks the range to the smallest rounding error, weighted by the
layer's input importance, then optionally a least-squares refit: ``clip_search``), with the
scales optionally double-quantized (``double_quant``: ``code * 2**e`` per row, see
:mod:`gwq_compile.packing` for how that is stored).  ``quantize_to_codes`` and
``dequantize_codes`` round onto a grid and back.  What is chosen here is stored by
:mod:`gwq_compile.packing`, the next stage; nothing here knows how codes are laid out.

The grid always contains 0 (``min(w_min, 0)``, ``max(w_max, 0)`` as GPTQ does), which is
what makes the zero-code trick of the stored outliers exact.  Outlier entries are left out
of each group's min/max, so one large weight does not stretch the grid of its 63 neighbours.

Example:
    >>> import torch
    >>> from gwq_compile import grid
    >>> scales, zeros = grid.compute_group_qparams(torch.randn(4, 100), None, bits=3, group_size=32)
    >>> scales.shape, scales.dtype, int(zeros.max()) <= 7
    (torch.Size([4, 4]), torch.float16, True)
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16
# Smallest positive fp16 subnormal: scales are clamped to it so an all-tiny group never
# gets a zero scale (which would turn every code into a division by zero).
_MIN_SCALE = 2.0**-24



def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` with -1 (one group per output row) resolved to ``in_features``."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise ValueError(f"group_size must be > 0 or -1 (per output channel), got {group_size!r}")
    return group_size



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
SCALE_CODE_MAX = (1 << SCALE_CODE_BITS) - 1
# Row exponents keep code * 2**e an exact fp16 value: 2**-24 is fp16's smallest subnormal,
# and 255 * 2**8 is below fp16's largest finite value.
_SCALE_EXP_MIN, _SCALE_EXP_MAX = -24, 8


def scale_exponents(scale_bound: torch.Tensor) -> torch.Tensor:
    """Per-row exponent ``e`` (int32 ``[N]``) of a double-quantized grid: the smallest with
    ``max(scale_bound) <= 255 * 2**e``, so the row's largest scale gets a code of 128-255."""
    top = scale_bound.float().amax(-1).clamp(min=_MIN_SCALE) / SCALE_CODE_MAX
    mantissa, exponent = torch.frexp(top)  # top = mantissa * 2**exponent, mantissa in [0.5, 1): exact, unlike ceil(log2)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return exponent.clamp(_SCALE_EXP_MIN, _SCALE_EXP_MAX).to(torch.int32)


def scale_code_step(exponents: torch.Tensor) -> torch.Tensor:
    """``2**e`` as fp32 ``[N, 1]``: one scale code's step in each row."""
    return torch.exp2(exponents.float()).unsqueeze(-1)


def snap_scales(scale: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """fp32 ``scale`` ``[N, G]`` rounded onto its row's grid ``code * 2**e`` (code in [1, 255])."""
    step = scale_code_step(exponents)
    return torch.round(scale / step).clamp(1, SCALE_CODE_MAX) * step


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
