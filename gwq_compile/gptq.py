"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) onto the GWQ packed grid, as pure tensor functions.

* :func:`gptq_quantize_weight`: one ``[N, K]`` weight and its input Hessian ``H = sum x x^T``
  -> a :class:`~gwq_compile.packing.PackedWeight`.  Standard GPTQ: Cholesky factor of the
  damped inverse Hessian, column blocks with lazy batch updates, optional act-order.
* :func:`hessian_saliency`: the OBS saliency ``w^2 / [H^-1]_jj`` used to pick outliers
  "by the Hessian" (SpQR-style) instead of by the gradient.
* :func:`add_input_gram`: the one formula of ``H``, accumulated by the calibration stage's
  forward hook (:func:`gwq_compile.calibration.prepare_weight`) for GWQ's own
  ``compensation="gptq"`` and ``saliency="hessian"``; the GPTQ peer's hooks
  (:mod:`gwq_tools.hessians`) call it too.

Group grids.  Without act-order the grid of a group (scale and zero, from
:func:`grid.compute_group_qparams`) is computed when GPTQ reaches the group's first
column, on the weights as updated by the errors of all earlier columns ("dynamic groups",
as the reference implementation does).  Blocks are aligned to group boundaries so those
weights are always fully updated.  With ``act_order=True`` the columns are visited by
decreasing ``H_jj``, which interleaves groups; since the packed format stores groups
contiguously in the original column order, the grids are then computed once up front
on the original weights ("static groups", GPTQ's ``static_groups=True``).

Outliers.  A weight under ``outlier_mask`` is not rounded: its quantization error is 0,
so it propagates no error, and it keeps absorbing the updates from earlier columns like
any unquantized weight (SpQR does the same).  What is stored in fp16 is therefore its
*GPTQ-updated* value, not the original one; with a diagonal Hessian (no updates at all)
the two coincide.  Outliers are left out of the group min/max.

Example:
    >>> import torch
    >>> from gwq_compile import packing
    >>> from gwq_compile.gptq import gptq_quantize_weight
    >>> x = torch.randn(512, 64); w = torch.randn(32, 64)
    >>> p = gptq_quantize_weight(w, x.T @ x, bits=3, group_size=32)
    >>> packing.dequantize_weight(p).shape
    torch.Size([32, 64])
"""

from __future__ import annotations

import contextlib

import torch

from gwq_compile import grid, packing

__all__ = ["add_input_gram", "damped_inverse_hessian", "gptq_quantize_weight", "hessian_saliency"]


def _check_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}] for a weight of shape {tuple(weight.shape)}, got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or inf")


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 copies of W and H with dead inputs handled as in GPTQ, and the damped H.

    A dead input (``H_jj == 0``: the channel was 0 on every calibration token) gets
    ``H_jj = 1`` so H stays invertible, and its weights are set to 0: the calibration set
    says nothing about them, so GPTQ drops them.
    """
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Damping relative to the mean diagonal, as GPTQ's percdamp: scale-free in H.
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    return w, h, dead


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), with a clear error if H is not PD."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    hinv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info.item() != 0:
        raise ValueError("the inverse Hessian is not positive definite; increase damp")
    return upper


def damped_inverse_hessian(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``(H + damp * mean(diag H) * I)^-1`` in fp32, dead inputs set to ``H_jj = 1`` first.

    Example:
        >>> import torch
        >>> x = torch.randn(100, 8)
        >>> damped_inverse_hessian(x.T @ x).shape
        torch.Size([8, 8])
    """
    _, h, _ = _prepare(torch.zeros(1, hessian.shape[0]), hessian, damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    return torch.cholesky_inverse(lower)


def hessian_saliency(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """OBS saliency ``w_ij^2 / [H^-1]_jj`` (``[N, K]``, fp32): the output-error increase of zeroing ``w_ij``.

    This is Optimal Brain Surgeon's ``L = w^2 / (2 [H^-1]_jj)`` without the constant 1/2;
    SpQR/GPTQ write the same quantity as ``err^2 / d_j^2`` with ``d_j`` the diagonal of the
    Cholesky factor of ``H^-1`` (hence the "squared" form), but with the full inverse's
    diagonal it is ``[H^-1]_jj`` to the first power: w^2 x^2 has the units of the output error.
    Large values mark the weights whose rounding would hurt the layer output most: keep
    the top ones in fp16.  Dead inputs (``H_jj == 0``) get saliency 0.

    Example:
        >>> import torch
        >>> x = torch.randn(256, 16); w = torch.randn(4, 16)
        >>> s = hessian_saliency(w, x.T @ x)
        >>> s.shape, bool((s >= 0).all())
        (torch.Size([4, 16]), True)
    """
    _check_hessian(weight, hessian)
    w, h, dead = _prepare(weight, hessian, damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError("the damped Hessian is not positive definite; increase damp")
    hinv_diag = torch.diag(torch.cholesky_inverse(lower))
    sal = w.pow(2) / hinv_diag.unsqueeze(0)
    sal[:, dead] = 0.0
    return sal


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """Run the column loop's tiny vector ops on one CPU thread.

    They take microseconds each, so on CPU the thread pool's wake-up costs more than the
    work (8x slower with 2 threads on a busy 2-core machine).  The thread count is restored.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _round_column(
    w: torch.Tensor, scale32: torch.Tensor, zero32: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column ``w [N]`` on per-row grids (fp32 ``[N]``).

    Same arithmetic as :func:`grid.quantize_to_codes` / :func:`grid.dequantize_codes`
    (fp32, the fp16 scale read back) so the packed result dequantizes to exactly what
    GPTQ used when it computed the errors.
    """
    q = torch.clamp(torch.round(w / scale32) + zero32, 0, maxq)
    return q, (q - zero32) * scale32


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    outlier_mask: torch.Tensor | None = None,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> packing.PackedWeight:
    """GPTQ-quantize ``weight [N, K]`` given ``hessian [K, K] = sum_t x_t x_t^T`` (fp32).

    Args:
        weight: the dense ``[out_features, in_features]`` weight (any float dtype).
        hessian: sum of input outer products over the calibration tokens; any positive
            scale works (damping is relative to its mean diagonal).
        bits, group_size, symmetric: the grid, as :func:`packing.quantize_weight`
            (``group_size=-1``: one group per row, computed once up front).
        outlier_mask: bool ``[N, K]``: weights kept in fp16 with zero quantization error
            (stored at their GPTQ-updated value, see the module docstring).
        damp: fraction of the mean ``H_jj`` added to the diagonal (GPTQ's percdamp).
        block_size: columns per lazy-batch block (rounded to a multiple of the group size
            when smaller groups are used, so each group starts on fully updated weights).
        act_order: visit columns by decreasing ``H_jj``; implies static groups.

    Returns:
        the packed weight; ``packing.dequantize_weight`` of it is the GPTQ solution.

    Example:
        >>> import torch
        >>> x = torch.randn(1024, 128); w = torch.randn(16, 128)
        >>> p = gptq_quantize_weight(w, x.T @ x, bits=4, group_size=64, act_order=True)
        >>> p.group_scales.shape
        torch.Size([16, 2])
    """
    packing.check_bits(bits)
    _check_hessian(weight, hessian)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n, k = weight.shape
    g = packing.effective_group_size(k, group_size)
    if outlier_mask is None:
        mask = torch.zeros(n, k, dtype=torch.bool, device=weight.device)
    else:
        if outlier_mask.shape != weight.shape or outlier_mask.dtype != torch.bool:
            raise ValueError(f"outlier_mask must be a bool tensor of shape {tuple(weight.shape)}, got {outlier_mask.dtype} {tuple(outlier_mask.shape)}")
        mask = outlier_mask.to(weight.device)
    maxq = (1 << bits) - 1

    w, h, _ = _prepare(weight, hessian, damp)
    n_groups = packing.num_groups(k, g)
    scales = torch.empty(n, n_groups, dtype=packing.SCALE_DTYPE, device=w.device)
    zeros = torch.empty(n, n_groups, dtype=torch.uint8, device=w.device)
    # Static grids: one group per row, or act-order (see module docstring).
    static = act_order or g >= k
    if static:
        scales, zeros = grid.compute_group_qparams(w, mask, bits, g, symmetric)

    perm = torch.arange(k, device=w.device)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    w = w[:, perm]
    h = h[perm][:, perm]
    m = mask[:, perm]
    group_of = perm // g  # original group of each visited column
    u = _upper_cholesky_of_inverse(h)

    if static:
        block = block_size
    else:  # group-aligned blocks: a group never starts on weights missing in-block updates
        block = (block_size // g) * g if g <= block_size else g
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    stored = torch.empty(n, k, dtype=torch.float32, device=w.device)  # dequantized or outlier value
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        current = -1
        with _single_thread(w.device):
            for i in range(i2 - i1):
                col = i1 + i
                if not static and col % g == 0:
                    # Blocks are group-aligned, so w1[:, i:i+g] holds every update so far.
                    s, z = grid.compute_group_qparams(w1[:, i : i + g], m[:, col : col + g], bits, g, symmetric)
                    scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
                gi = int(group_of[col])
                if gi != current:  # fp32 copies of the grid once per group, not per column
                    current, scale32, zero32 = gi, scales[:, gi].float(), zeros[:, gi].float()
                wc = w1[:, i]
                q, deq = _round_column(wc, scale32, zero32, maxq)
                deq = torch.where(m[:, col], wc, deq)  # outliers: no rounding, no error
                codes[:, col] = q.to(torch.uint8)
                stored[:, col] = deq
                e = (wc - deq) / u1[i, i]
                w1[:, i:].sub_(e.unsqueeze(1) * u1[i, i:].unsqueeze(0))
                err1[:, i] = e
        # Lazy batch update of all later columns with this block's errors (one big matmul: all threads).
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, stored = codes[:, inv], stored[:, inv]
    # quantize_weight takes the outlier values from `stored` (the updated weights) and
    # raises if one left the fp16 range.
    return packing.quantize_weight(
        stored, mask, bits, g, symmetric, group_scales=scales, group_zeros=zeros, codes=codes
    )


def add_input_gram(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + X^T X`` (fp32 ``[K, K]``, in place when ``total`` is given) for the rows ``X`` of a
    linear's input ``x`` (any leading dims): the one place a GPTQ Hessian is accumulated."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x.T @ x if total is None else total.addmm_(x.T, x)
