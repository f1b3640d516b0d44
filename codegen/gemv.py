"""Small-M GWQ linear (decode, ``M <= 16``): one fused GEMV / split-K tile program.

``y[m, n] = sum_k x[m, k] * ((code[n, k] - zero[n, g(k)]) * scale[n, g(k)])
           + sum_{j in row n of the CSR} values[j] * x[m, col_idx[j]]  (+ bias[n])``

The grid is ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``; split ``s`` walks the K tiles
``s, s + SPLIT_K, ...``.

* ``SPLIT_K == 1`` (the default, see :func:`default_config`): each program owns its
  output tile and stores it once, in the output's dtype.  One launch, nothing allocated
  but the output, nothing to zero: what a decode step inside a CUDA graph wants.
* ``SPLIT_K > 1``: splits ``tl.atomic_add`` fp32 partial sums into a zeroed fp32 output
  (the launcher then casts it for fp16/bf16 x).  That costs a memset and, for 16-bit x, a
  cast launch, so the launcher's one-time tuner times those with the kernel and keeps a
  split-K config only where it wins as a whole (few, long rows: ``N`` small, ``K`` large).

With ``BLOCK_M < 16`` the product is a broadcast-multiply on CUDA cores into a
``[BLOCK_M, BLOCK_N, BLOCK_K]`` fp32 accumulator that is reduced over K once, after the
loop (``tl.dot`` needs 16 rows, and for M = 1..8 most of them would be padding; reducing
per iteration would add a cross-thread reduction to every K step).  With
``BLOCK_M >= 16`` it is ``tl.dot`` (fp32 x: ``input_precision="ieee"``, never TF32, to
match ``torch.matmul``'s default; 16-bit x: the weight tile is rounded to x's dtype).

Outliers are read per output tile, after the K loop: the program loads ``row_ptr`` for
its ``BLOCK_N`` rows and loops ``j`` up to the longest row of the tile, gathering
``x[:, col_idx[start_n + j]]`` (already in L1/L2) for each row, masked past that row's
count.  Split-K programs share that loop round-robin (split ``s`` takes
``j = s, s + SPLIT_K, ...``).  The stored code at an outlier equals the zero point, so
the dense part is exactly 0 there and the outliers are only ever added.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from gwq_compile.codegen.unpack import INTERPRETED, _max_combine, _sum_combine, dequant_tile

# Register budgets per thread that the pruner enforces.  They come from ptxas resource
# usage of these kernels for sm_90 (cuobjdump -res-usage): past them the tiles spill to
# local memory.  GEMV form: the [BLOCK_M, BLOCK_N, BLOCK_K] fp32 accumulator; tl.dot
# form: the fp32 accumulator and the dequantized weight tile.
_GEMV_ACC_PER_THREAD = 128
_DOT_ACC_PER_THREAD = 64
_DOT_W_TILE_PER_THREAD = 64
#: Config knobs a caller may force (``gwq_linear_triton(..., config=...)``).
KNOBS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages")


@triton.jit
def gwq_gemv_kernel(
    # pointers
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, plane1_offset,
    # strides
    stride_xm, stride_xk, stride_cn, stride_sn, stride_zn, stride_om,
    # format
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    # tuning
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """``out[M, N]`` (``SPLIT_K == 1``: stored in its dtype; else fp32, zeroed, added to)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    if BLOCK_M >= 16:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:
        acc3 = tl.full((BLOCK_M, BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for k_tile in range(pid_k, (K + BLOCK_K - 1) // BLOCK_K, SPLIT_K):
        k0 = k_tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = dequant_tile(
            codes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, plane1_offset,
            stride_cn, stride_sn, stride_zn, BITS, GROUP_SIZE, BLOCK_K,
        )  # fmt: skip
        if BLOCK_M >= 16:
            if a.dtype == tl.float32:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
        else:
            acc3 += a.to(tl.float32)[:, None, :] * w[None, :, :]
    if BLOCK_M < 16:
        acc = tl.reduce(acc3, 2, _sum_combine)

    if HAS_OUTLIERS:
        start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
        count = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        for j in range(pid_k, tl.reduce(count, 0, _max_combine), SPLIT_K):
            valid = j < count
            col = tl.load(col_idx_ptr + start + j, mask=valid, other=0).to(tl.int64)
            val = tl.load(values_ptr + start + j, mask=valid, other=0.0).to(tl.float32)
            xv = tl.load(x_rows + col[None, :] * stride_xk, mask=mask_m[:, None] & valid[None, :], other=0.0)
            acc += xv.to(tl.float32) * val[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]  # one split adds it

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------- configs


def block_m_for(m: int) -> int:
    """Rows per program: M rounded up to a power of two, at most 16 (more M blocks beyond)."""
    return min(16, 1 << max(0, math.ceil(math.log2(max(1, m)))))


def configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """Candidate configs the launcher's one-time tuner times (``BLOCK_M`` from M).

    Under the interpreter: one config, so nothing is ever timed on CPU (``SPLIT_K=2``, so
    the CPU tests exercise the atomic split-K reduction too).
    """
    if interpreted:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4)]
    tiles = [(16, 128, 4), (16, 256, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)]
    out = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1}, num_warps=w, num_stages=3) for bn, bk, w in tiles]
    out += [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=4, num_stages=3)
        for split in (2, 4)
        for bn, bk in [(32, 128), (64, 64)]
    ]
    return out


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fits_registers(block_m: int, c: triton.Config) -> bool:
    threads = 32 * c.num_warps
    bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    if block_m < 16:  # GEMV form
        return block_m * bn * bk <= _GEMV_ACC_PER_THREAD * threads
    return block_m * bn <= _DOT_ACC_PER_THREAD * threads and bk * bn <= _DOT_W_TILE_PER_THREAD * threads


def prune(candidates: list[triton.Config], n: int, k: int, block_m: int, group_size: int) -> list[triton.Config]:
    """Drop configs that cannot pay off for this shape (never returns an empty list).

    * tiles that would spill registers (budgets at the top of this module);
    * ``BLOCK_K`` / ``BLOCK_N`` far beyond K / N only add masked work;
    * more splits than K tiles leave programs idle;
    * prefer tiles that do not straddle a quantization group (one scale load per row).
    """
    kept = []
    for c in candidates:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if bk > max(32, _next_pow2(k)) or bn > max(32, _next_pow2(n)):
            continue
        if split > 1 and split > math.ceil(k / bk):
            continue
        if not fits_registers(block_m, c):
            continue
        kept.append(c)
    if not kept:  # tiny shapes: the smallest tile
        kept = [min(candidates, key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]))]
    aligned = [c for c in kept if group_size % c.kwargs["BLOCK_K"] == 0]
    return aligned or kept


def default_config(n: int, k: int, block_m: int, group_size: int, interpreted: bool = INTERPRETED) -> triton.Config:
    """The config used when nothing was tuned (e.g. the first call is traced by
    torch.compile, where nothing can be timed): ``SPLIT_K=1`` and the widest ``BLOCK_N``
    that still gives at least 256 programs (about two per SM of an H100/H200), so one
    launch fills the GPU with no atomics, memset or cast."""
    kept = prune(configs(interpreted), n, k, block_m, group_size)
    if interpreted:
        return kept[0]
    single = [c for c in kept if c.kwargs["SPLIT_K"] == 1] or kept
    filling = [c for c in single if math.ceil(n / c.kwargs["BLOCK_N"]) >= 256]
    pool = filling or [min(single, key=lambda c: c.kwargs["BLOCK_N"])]
    return max(pool, key=lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
