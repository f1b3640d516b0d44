"""The CPU runtime layout of a GWQ weight: torch's int4 CPU GEMM operand, derived from the stored format.

On CPU, ``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by 4-bit
codes packed in a CPU-specific ("opaque") order, one bf16 ``(scale, zero)`` pair per tile
group of 32/64/128/256 weights along K, with ``w = (q - 8) * scale + zero``.  With bf16
activations it beats an fp32 ``F.linear`` at every M on this project's CPUs (with fp32
activations it is ~10x slower, so the activations are rounded to bf16 for it: this is
where the CPU path computes in bf16).  This module turns a stored
:class:`~gwq_compile.packing.PackedWeight` into that operand, back again (exactly), and runs
the linear:

* **codes**: ``cpu_int4_codes`` uint8 ``[Np, Kc / 2]``.  Every GWQ code fits a nibble
  (2- and 3-bit ones shifted by :func:`code_offset`) except 8-bit ones, which are split into a high and a low nibble laid side by side along
  K (``Kc = 2 Kp``; the activations are repeated to match), so 2-, 3- and 4-bit weights
  cost 4 bits per weight here and 8-bit ones 8.  ``Np`` pads N to a multiple of
  :data:`BLOCK_N` (the kernel needs 16; 64 keeps every row block full, see
  :func:`nibble_map`), ``Kp`` pads each group to a multiple of 32 columns (no padding for
  group sizes that are multiples of 32, only the partial last group).
* **grid**: ``cpu_scales_zeros`` bf16 ``[Kc / tile_group, Np, 2]``: GWQ's
  ``(code - zero) * scale`` is ``(code - 8) * scale + (8 - zero) * scale``, repeated for
  every tile group of a GWQ group.  bf16 scales are the kernel's; the exact fp16 scales
  and uint8 zeros stay in the ``GWQTensor`` (they are the stored format).
* **outliers** stay the stored CSR (int16 columns, fp16 values) and are added in fp32.

:func:`linear` runs it all in one call of the compiled kernel ``torch.ops.gwq_cpu.linear``
(``csrc/cpu_linear.cpp``, built on first use by :mod:`gwq_compile.cpu_kernel`), which adds
the outliers and the bias in the same pass that stores the output.  It has three paths on
this one operand, by the rows M of x (limits measured by ``benchmarks/cpu_kernels.py``):

* M <= :func:`gemv_max_rows` (decode; 2 or 31 rows by CPU): its own GEMV, on CPUs with AVX512-BF16 the bf16 one
  (``csrc/cpu_gemv_bf16.h``: bf16 x against the exact codes with fp32 accumulation), on other
  AVX2 CPUs the integer one (``csrc/cpu_gemv_avx2.h``: x rounded to int16 per tile group,
  2**-16 of the group's largest entry, exact codes, exact int32 sums); the fp16 outliers
  added in fp32 with fp32 x;
* other M below :data:`TILE_MIN_ROWS`: torch's int4 GEMM (bf16 x), outliers as above;
* M >= :data:`TILE_MIN_ROWS` (prefill): up to 256 rows of the weight at a time are
  dequantized into a tile that stays in cache and multiplied by x with ``at::mm``, so the
  dense weight is never built whole.  With AVX512-BF16 the tile and x are bf16 (the
  outliers rounded into the tile: the salient weights at bf16 precision, as in a bf16
  model), since the bf16 GEMM runs ~3.5x the fp32 one here; elsewhere fp32 and exact.

So the CPU path computes in bf16 at every M on such CPUs: x rounded to bf16 everywhere, the
weight rounded to bf16 only in prefill tiles; accumulation is fp32 throughout.
:func:`linear_aten` is the int4 computation in ATen ops (the outliers by one
``torch.sparse.mm``) at every M, for machines without a compiler and as a second
implementation the tests hold to the same bound.

Resident bytes for W4 g64 + 0.5 % outliers: 4 (codes) + 0.5 (bf16 tile grid) + 0.375
(stored grid) + ~0.2 (CSR) bits per weight, against 4.58 stored: 1.1x.  W3/W2 take the
same 4 bits per code here (1.3-1.5x their stored size).

Example:
    >>> import torch
    >>> from gwq_compile import packing, cpu_layout
    >>> p = packing.quantize_weight(torch.randn(40, 100), torch.rand(40, 100) < 0.02, bits=3, group_size=32)
    >>> codes, grid = cpu_layout.pack(p)
    >>> torch.equal(cpu_layout.unpack_codes(codes, p.bits, p.group_size, p.in_features, 40), p.packed_codes)
    True
    >>> x = torch.randn(2, 100)
    >>> y = cpu_layout.linear(x, codes, grid, *p[3:6], None, p.bits, p.group_size, p.in_features)
    >>> bool(torch.allclose(y, x @ packing.dequantize_weight(p).T, rtol=0.02, atol=0.05))
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from gwq_compile import cpu_kernel, dispatch, packing

__all__ = ["BLOCK_N", "KMap", "available", "k_map", "linear", "linear_aten", "pack", "unpack_codes", "unpack_rows"]

#: Rows per block of the packed operand: a multiple of the kernel's N block on every CPU
#: capability (64 for AVX-512, 32 for AVX2 and the scalar fallback), so the operand is a
#: plain concatenation of independent 64-row blocks.
BLOCK_N = 64
#: Group sizes the kernel accepts, largest first.
TILE_GROUPS = (256, 128, 64, 32)
COMPUTE_DTYPE = torch.bfloat16
#: From this many rows of x on, the compiled kernel dequantizes the weight one 64-row block at
#: a time into a tile and multiplies x by it with at::mm: there torch's int4 GEMM is slower
#: than a dense GEMM on this project's CPUs (``benchmarks/results/cpu_kernels_*.md``: at 32 rows
#: the tile is 0.55-0.87x int4 on an AVX2 EPYC, mixed on an AVX512-BF16 one; faster on both from 64).
TILE_MIN_ROWS = 32
#: Up to how many rows of x the compiled kernel runs its own GEMV over the same packing
#: instead of torch's int4 GEMM, by the GEMV this CPU has (``benchmarks/results/cpu_kernels_*.md``):
#: the bf16 one (``csrc/cpu_gemv_bf16.h``, AVX512-BF16) beats int4 at 1-2 rows and is mixed
#: from 4; the integer one (``csrc/cpu_gemv_avx2.h``, AVX2) takes 0.43-0.85x int4's time at
#: every M from 1 to 32 on every SmolLM2 shape, so there it serves every M below the tiles.
GEMV_MAX_ROWS_BY_ISA = {"avx512_bf16": 2, "avx2": TILE_MIN_ROWS - 1}

# torch warns once per process that CSR tensors are "in beta" when outlier_product builds
# one; that is torch's note about its API, not about this product.  Only warnings raised
# from this module are filtered.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning, module=__name__)
_ZERO_CODE = 8  # the kernel's implicit zero point


@torch.compiler.assume_constant_result  # fixed for the process: compiled graphs take it as a constant
def gemv_max_rows() -> int:
    """Rows of x up to which the compiled kernel runs its GEMV on this CPU (0: it has none)."""
    return GEMV_MAX_ROWS_BY_ISA.get(cpu_kernel.gemv_isa(), 0)


def code_offset(bits: int) -> int:
    """Added to 2- and 3-bit codes in their nibble, so they sit around the kernel's zero point 8:
    then ``(q - 8) * scale`` and the bf16 ``zero`` stay of the size of the weights and the
    bf16 rounding of the grid costs ~2**-9 of a weight, not of an offset 8x larger."""
    return _ZERO_CODE - (1 << (bits - 1)) if bits < 4 else 0


def available() -> bool:
    """Whether this torch build has the int4 CPU GEMM (every release from 2.5 does)."""
    aten = torch.ops.aten
    return hasattr(aten, "_weight_int4pack_mm_for_cpu") and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")


# ----------------------------------------------------------------------------- geometry along K


class KMap(NamedTuple):
    """How the K columns of a weight map onto the kernel's padded columns.

    ``group_size`` (g, effective) columns of a GWQ group occupy ``padded_group`` (gp, a
    multiple of 32) kernel columns; ``padded_k = groups * gp``; ``tile_group`` is the
    kernel's group size (the largest of :data:`TILE_GROUPS` dividing gp); ``columns`` is
    the number of nibble columns (``2 padded_k`` for 8-bit codes).  ``gather`` is the
    ``[padded_k]`` source column of each kernel column (``in_features`` for padding) when
    groups are padded in the middle of a row; otherwise the activations are only
    zero-padded at the end by ``pad``.
    """

    in_features: int
    group_size: int
    groups: int
    padded_group: int
    padded_k: int
    tile_group: int
    columns: int
    pad: int
    gather: Optional[torch.Tensor]


@functools.lru_cache(maxsize=256)
def k_map(in_features: int, group_size: int, bits: int) -> KMap:
    """The :class:`KMap` of a ``[*, in_features]`` weight (pure function of its arguments, cached).

    Example:
        >>> m = k_map(100, 48, 4)
        >>> m.padded_group, m.padded_k, m.tile_group, m.gather is not None
        (64, 192, 64, True)
    """
    g = packing.effective_group_size(in_features, group_size)
    groups = math.ceil(in_features / g)
    gp = g if g % 32 == 0 else 32 * math.ceil(g / 32)
    padded_k = groups * gp
    tile_group = next(t for t in TILE_GROUPS if gp % t == 0)
    gather = None
    if gp != g and groups > 1:
        j = torch.arange(padded_k)
        src = (j // gp) * g + j % gp
        gather = torch.where((j % gp < g) & (src < in_features), src, torch.full_like(src, in_features))
    return KMap(in_features, g, groups, gp, padded_k, tile_group, padded_k * (2 if bits == 8 else 1), padded_k - in_features, gather)


def kernel_ints(in_features: int, group_size: int, bits: int) -> tuple[int, int, bool] | None:
    """``(tile_group, pad, repeat_k)`` of the compiled kernel's call for weights whose groups
    need no gather (group sizes that are multiples of 32, or one group per row), else None:
    plain integer arithmetic (the same as :func:`k_map`), so torch.compile folds it."""
    g = packing.effective_group_size(in_features, group_size)
    groups = math.ceil(in_features / g)
    gp = g if g % 32 == 0 else 32 * math.ceil(g / 32)
    if gp != g and groups > 1:
        return None
    return next(t for t in TILE_GROUPS if gp % t == 0), groups * gp - in_features, bits == 8


def _kernel_columns(km: KMap) -> torch.Tensor:
    """Kernel column of each of the ``in_features`` weight columns (int64 ``[K]``)."""
    c = torch.arange(km.in_features)
    return (c // km.group_size) * km.padded_group + c % km.group_size


# ----------------------------------------------------------------------------- the opaque nibble order


@functools.lru_cache(maxsize=64)
def nibble_map(columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each code of a ``[BLOCK_N, columns]`` block lands in the packed operand.

    Returns ``(byte, shift)``, int64 and uint8 ``[BLOCK_N, columns]``: code ``(n, k)`` is
    ``(block_bytes[byte[n, k]] >> shift[n, k]) & 15``.  The order depends on the CPU
    capability torch was dispatched to, so it is not written down here: it is read off
    torch's own packing routine by packing the 4-bit digits of each code's index.

    Example:
        >>> byte, shift = nibble_map(64)
        >>> byte.shape, int(byte.max()) == BLOCK_N * 64 // 2 - 1
        (torch.Size([64, 64]), True)
    """
    index = torch.arange(BLOCK_N * columns, dtype=torch.int64)
    source = torch.zeros(BLOCK_N * columns, dtype=torch.int64)  # source index of each packed nibble
    digits = max(1, math.ceil(math.log2(BLOCK_N * columns) / 4))
    for d in range(digits):
        digit = ((index >> (4 * d)) & 15).to(torch.int32).view(BLOCK_N, columns)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 8).view(-1).long()
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).view(-1)
        source |= nibbles << (4 * d)
    position = torch.empty_like(source)
    position[source] = torch.arange(source.numel())
    if not torch.equal(torch.sort(source).values, index):
        raise RuntimeError("torch's int4 CPU packing is not a permutation of nibbles; this gwq-compile cannot read it")
    position = position.view(BLOCK_N, columns)
    return position // 2, ((position % 2) * 4).to(torch.uint8)


# ----------------------------------------------------------------------------- stored <-> runtime


def _padded_rows(n: int) -> int:
    return BLOCK_N * math.ceil(n / BLOCK_N)


def pack(packed: packing.PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cpu_int4_codes, cpu_scales_zeros)`` of a stored weight (see the module docstring)."""
    n, k, bits = packed.packed_codes.shape[0], packed.in_features, packed.bits
    km = k_map(k, packed.group_size, bits)
    n_pad = _padded_rows(n)
    codes = packing.unpack_codes(packed.packed_codes, bits, k).to(torch.int32)
    nibbles = torch.zeros(n_pad, km.columns, dtype=torch.int32)
    cols = _kernel_columns(km)
    if bits == 8:
        nibbles[:n, cols] = codes >> 4
        nibbles[:n, cols + km.padded_k] = codes & 15
    else:
        nibbles[:n, cols] = codes + code_offset(bits)
    int4_codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 8)

    scale = packed.group_scales.float()  # [N, G]
    zero = packed.group_zeros.float()
    if bits == 8:  # (16 hi + lo - z) s = (hi - 8) 16 s + (lo - 8) s + (136 - z) s
        scales = torch.cat([16 * scale, scale], dim=1)
        zeros = torch.cat([(16 * _ZERO_CODE + _ZERO_CODE - zero) * scale, torch.zeros_like(scale)], dim=1)
    else:  # (c - z) s = (q - 8) s + (8 - offset - z) s with q = c + offset
        scales, zeros = scale, (_ZERO_CODE - code_offset(bits) - zero) * scale
    per_group = km.padded_group // km.tile_group  # tile groups per GWQ group
    grid = torch.zeros(n_pad, scales.shape[1] * per_group, 2)
    grid[:n, :, 0] = scales.repeat_interleave(per_group, dim=1)
    grid[:n, :, 1] = zeros.repeat_interleave(per_group, dim=1)
    return int4_codes.contiguous(), grid.transpose(0, 1).to(COMPUTE_DTYPE).contiguous()


def _nibble_columns(int4_codes: torch.Tensor, columns: int, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """uint8 ``[Np or len(rows), columns]``: the 4-bit values of every (or of the given) row."""
    blocks = int4_codes.view(-1, BLOCK_N * columns // 2)
    byte, shift = nibble_map(columns)
    if rows is None:
        values = blocks[:, byte.view(-1)].view(-1, BLOCK_N, columns) >> shift
        return (values & 15).view(-1, columns)
    block, local = rows // BLOCK_N, rows % BLOCK_N
    return (blocks[block.unsqueeze(1), byte[local]] >> shift[local]) & 15


def unpack_rows(int4_codes: torch.Tensor, bits: int, group_size: int, in_features: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 GWQ codes ``[N, K]`` (padding rows included) or ``[len(rows), K]``: the inverse of :func:`pack`'s codes."""
    km = k_map(in_features, group_size, bits)
    values = _nibble_columns(int4_codes, km.columns, rows)
    cols = _kernel_columns(km)
    if bits == 8:
        return (values[:, cols] << 4) | values[:, cols + km.padded_k]
    return values[:, cols] - code_offset(bits)


def unpack_codes(int4_codes: torch.Tensor, bits: int, group_size: int, in_features: int, out_features: int) -> torch.Tensor:
    """The stored bit-plane ``packed_codes`` (exact) of a CPU-layout weight."""
    codes = unpack_rows(int4_codes, bits, group_size, in_features)[:out_features]
    return packing.pack_codes(codes.contiguous(), bits)


# ----------------------------------------------------------------------------- the linear


def outlier_product(x2: torch.Tensor, outlier_row_ptr: torch.Tensor, outlier_col_idx: torch.Tensor, outlier_values: torch.Tensor) -> torch.Tensor:
    """``x2 @ S.T`` for the CSR outliers ``S`` ``[N, K]``, fp32 ``[N, M]`` (transposed: it is added as ``.T``).

    ``torch.sparse.mm`` is fast for a CSR matrix times a contiguous dense one; it has no
    bf16 path, so the product is fp32 (the stored fp16 values are exact in fp32).
    """
    n, k = outlier_row_ptr.numel() - 1, x2.shape[1]
    index = outlier_row_ptr.dtype  # CSR wants one index dtype (int32 as stored)
    sparse = torch.sparse_csr_tensor(
        outlier_row_ptr, outlier_col_idx.to(index), outlier_values.float(), (n, k), check_invariants=False
    )
    return torch.sparse.mm(sparse, x2.float().t().contiguous())


def linear_aten(
    x: torch.Tensor,
    cpu_int4_codes: torch.Tensor,
    cpu_scales_zeros: torch.Tensor,
    outlier_row_ptr: torch.Tensor,
    outlier_col_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` on the CPU layout in ATen ops, in ``x``'s dtype (the int4 product in bf16,
    outliers in fp32): what the compiled kernel (``csrc/cpu_linear.cpp``) does in one call."""
    km = k_map(in_features, group_size, bits)
    n = outlier_row_ptr.numel() - 1
    x2 = x.reshape(-1, in_features)
    xb = x2.to(COMPUTE_DTYPE)
    if km.gather is not None:
        xb = F.pad(xb, (0, 1))[:, km.gather]  # padded kernel columns read the appended zero
    elif km.pad:
        xb = F.pad(xb, (0, km.pad))
    if bits == 8:
        xb = torch.cat([xb, xb], dim=1)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), cpu_int4_codes, km.tile_group, cpu_scales_zeros)
    out = y[:, :n].to(x.dtype).contiguous() if (y.shape[1] != n or x.dtype != y.dtype) else y
    if outlier_values.numel():
        out.add_(outlier_product(x2, outlier_row_ptr, outlier_col_idx, outlier_values).t())
    if bias is not None:
        out.add_(bias)
    return out.view(*x.shape[:-1], n)


def linear(
    x: torch.Tensor,
    cpu_int4_codes: torch.Tensor,
    cpu_scales_zeros: torch.Tensor,
    outlier_row_ptr: torch.Tensor,
    outlier_col_idx: torch.Tensor,
    outlier_values: torch.Tensor,
    bias: Optional[torch.Tensor],
    bits: int,
    group_size: int,
    in_features: int,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` on the CPU layout, in ``x``'s dtype, by ``kernel`` (``"ext"``, the
    compiled one, or ``"aten"``; default: what :func:`gwq_compile.dispatch.cpu_kernel` picks)."""
    kernel = kernel or dispatch.cpu_kernel()
    dispatch.count(f"cpu_int4_{kernel}")
    if kernel == "ext":
        km = k_map(in_features, group_size, bits)
        return torch.ops.gwq_cpu.linear.default(
            x, cpu_int4_codes, cpu_scales_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias,
            km.tile_group, in_features, km.pad, km.gather, bits == 8, TILE_MIN_ROWS, gemv_max_rows(),
        )  # fmt: skip
    return linear_aten(x, cpu_int4_codes, cpu_scales_zeros, outlier_row_ptr, outlier_col_idx, outlier_values, bias, bits, group_size, in_features)


def run(x: torch.Tensor, args: tuple, kernel: str) -> torch.Tensor:
    """Body of ``torch.ops.gwq.linear_cpu`` on ``args`` (``ops.CPU_SCHEMA`` after ``x``) with the
    given kernel; counted in ``dispatch.CALLS["cpu_int4"]``."""
    dispatch.check_input(x, args[0], args[-1])
    dispatch.count("cpu_int4")
    int4_codes, int4_grid, _scales, _zeros, row_ptr, col_idx, values, bias, bits, group_size, in_features = args
    return linear(x, int4_codes, int4_grid, row_ptr, col_idx, values, bias, bits, group_size, in_features, kernel)  # its own bf16 grid


def linear_op(x: torch.Tensor, *args) -> torch.Tensor:
    """Body of the registered ``torch.ops.gwq.linear_cpu``."""
    return run(x, args, dispatch.cpu_kernel())
