"""Large-M GWQ linear (prefill, ``M > 16``): dequantize to a dense weight, then cuBLAS.

Measured on an H100 (``benchmarks/results/kernel_probe_nvidia-h100-80gb-hbm3.json`` and
``kernels_notes.md``): prefill is compute-bound (68.7 GFLOP against 9.5 MB of packed
weight at M = 2048 on 4096 x 4096), cuBLAS's product is far faster than a fused Triton
GEMM (the fused GEMM took 3.0 ms, 0.54 ms without outliers, against 90 us for cuBLAS),
and writing the dense weight once per call costs little next to the product.  The
fused GEMM (``path="gemm"``) lost at every measured M >= 64 and was deleted.

:func:`gwq_dequant_kernel` writes ``W = dequant(codes) + scatter(outliers)`` in x's dtype
in one launch.  A program owns ``BLOCK_N`` rows and ``K_TILES`` consecutive K tiles of
``BLOCK_K``: it stores its dense tiles (outlier positions come out exactly 0, they hold
the zero code), waits at a barrier so those stores are ordered before the next ones,
then stores the CSR outliers of its rows whose column falls in its K span.  Each
program scans its rows' whole CSR lists, so the outlier lists are read
``cdiv(K, BLOCK_K * K_TILES)`` times: a few hundred KB at 1 % outliers, small next to
the 2 bytes written per weight.  Tiles are contiguous along K, so each thread stores
consecutive elements (vector stores).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gwq_compile.codegen.unpack import INTERPRETED, _max_combine, dequant_tile

#: Config knobs a caller may force (``gwq_dequantize_triton(..., config=...)``).
KNOBS = ("BLOCK_N", "BLOCK_K", "K_TILES", "num_warps", "num_stages")


@triton.jit
def gwq_dequant_kernel(
    codes_ptr, scales_ptr, zeros_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, w_ptr,
    N, K, plane1_offset, stride_cn, stride_sn, stride_zn, stride_wn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr,
):  # fmt: skip
    """Dense ``w[N, K]`` (its dtype, computed in fp32) for rows ``pid_n * BLOCK_N ..`` and
    K span ``pid_k * BLOCK_K * K_TILES ..``, outliers included."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    k_lo = pid_k * (BLOCK_K * K_TILES)
    for t in range(0, K_TILES):
        k0 = k_lo + t * BLOCK_K
        w = dequant_tile(
            codes_ptr, scales_ptr, zeros_ptr, offs_n, k0, N, K, plane1_offset,
            stride_cn, stride_sn, stride_zn, BITS, GROUP_SIZE, BLOCK_K,
        )  # fmt: skip
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(rows[:, None] + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask_n[:, None] & (offs_k[None, :] < K))
    if HAS_OUTLIERS:
        tl.debug_barrier()  # the dense zeros above land before the outliers overwrite them
        k_hi = k_lo + BLOCK_K * K_TILES
        start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
        count = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        for j in range(0, tl.reduce(count, 0, _max_combine)):
            valid = j < count
            col = tl.load(col_idx_ptr + start + j, mask=valid, other=0).to(tl.int64)
            val = tl.load(values_ptr + start + j, mask=valid, other=0.0)
            mine = valid & (col >= k_lo) & (col < k_hi)
            tl.store(rows + col, val.to(w_ptr.dtype.element_ty), mask=mine)


# ----------------------------------------------------------------------------- configs


def configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """Candidate configs the launcher's one-time tuner times (one under the interpreter;
    ``K_TILES=2`` there so the CPU tests cover a program spanning several tiles)."""
    if interpreted:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "K_TILES": 2}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "K_TILES": kt}, num_warps=w)
        for bn, bk, kt, w in [
            (32, 128, 4, 4), (64, 128, 2, 4), (64, 128, 8, 4), (128, 128, 4, 8),
            (32, 256, 2, 4), (16, 256, 8, 4), (64, 64, 8, 4),
        ]
    ]  # fmt: skip


def prune(candidates: list[triton.Config], n: int, k: int, group_size: int) -> list[triton.Config]:
    """Prefer tiles that do not straddle a quantization group; drop spans far beyond K
    (never returns an empty list)."""
    kept = [c for c in candidates if c.kwargs["BLOCK_K"] <= max(64, k)] or candidates
    aligned = [c for c in kept if group_size % c.kwargs["BLOCK_K"] == 0]
    return aligned or kept


def default_config(n: int, k: int, group_size: int, interpreted: bool = INTERPRETED) -> triton.Config:
    """The config used when nothing was tuned: the first candidate left by :func:`prune`."""
    return prune(configs(interpreted), n, k, group_size)[0]
