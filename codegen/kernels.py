"""Fused GWQ dequant-GEMM-outlier Triton tile programs and their autotune configs.

``y[m, n] = sum_k x[m, k] * ((code[n, k] - zero[n, g(k)]) * scale[n, g(k)])
           + sum_{j in row n of the CSR} values[j] * x[m, col_idx[j]]  (+ bias[n])``

with the packed layout of :mod:`gwq_compile.packing` (read that module for the format).
Two kernel families share one dequantization helper and one epilogue helper:

* :func:`gwq_splitk_kernel`, the small-M path (decode, M <= 16).  The grid is
  ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``: split ``s`` walks K tiles
  ``s, s + SPLIT_K, ...`` so that a handful of output columns still fill the GPU, and
  every split atomically adds its fp32 partial sums into a zeroed fp32 workspace (the
  launcher casts that to the activation dtype).  With ``BLOCK_M < 16`` the product is a
  GEMV-style broadcast-multiply-reduce on CUDA cores (``tl.dot`` needs 16 rows, and
  for M = 1..8 most of them would be padding); with ``BLOCK_M >= 16`` it is ``tl.dot``.
* :func:`gwq_gemm_kernel`, the large-M path (prefill): the classic tiled ``tl.dot``
  GEMM with grouped ("super-grouped") program ordering for L2 reuse, one program per
  output tile, the whole K loop inside, a direct masked store in the output dtype.

and a third, unfused path that the launcher takes for M > 16 because it is faster on an
H100 (numbers in the comment above it): :func:`gwq_dequant_kernel` +
:func:`gwq_scatter_outliers_kernel` write the dense weight, then cuBLAS multiplies.

Outliers (the CSR part) are read inside the kernel, not by a second kernel or a dense
``W`` matrix: after its K loop a program loads ``row_ptr`` for its ``BLOCK_N`` output
columns and loops ``j`` up to the largest row count in the tile, gathering
``x[:, col_idx[start_n + j]]`` for each column (masked where ``j`` is past that row's
count) and adding ``x * value`` to the fp32 accumulator.  The gather hits x that is
already in L1/L2, costs ``O(BLOCK_M * BLOCK_N)`` per ``j`` and, at ~1 % outliers, a small
fraction of the K loop.  Split-K programs share that loop round-robin (split ``s``
takes ``j = s, s + SPLIT_K, ...``) so it does not land on one split.  Because the
stored code at an outlier position equals the zero point, the dense part is exactly 0
there and the kernels only ever *add* the outliers.

Numerics: codes are dequantized in fp32; for ``tl.dot`` the weight tile is rounded to
the activation dtype (fp16/bf16 tensor cores; fp32 activations use ``input_precision=
"ieee"``, never TF32, to match ``torch.matmul``'s default); accumulation is always
fp32 and the output is cast once at the store.

Triton chooses between compiling and interpreting (``TRITON_INTERPRET=1``) when
``@triton.jit`` runs, i.e. when this module is imported; :data:`INTERPRETED` records
which one happened.  :mod:`gwq_compile.codegen.launch` loads a second, interpreted copy
of this module for CPU tensors when needed (see the note above the helpers).  Under the
interpreter the autotune config lists hold a single config, so nothing is benchmarked
on CPU.

Example (the launcher in :mod:`gwq_compile.codegen.launch` is the normal entry point):
    >>> from gwq_compile.codegen import kernels
    >>> [c.kwargs["BLOCK_N"] for c in kernels.gemm_configs(interpreted=True)]
    [32]
"""

from __future__ import annotations

import math

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gwq_compile.codegen.kernels needs the `triton` package (pip install 'triton>=3.3'); "
        "without it use GWQ_KERNEL=reference"
    ) from exc

from triton.runtime.jit import JITFunction

# Register budgets per thread that the pruners enforce.  They come from ptxas resource
# usage of these kernels for sm_90 (cuobjdump -res-usage): past them the tiles spill to
# local memory.  GEMV form: BLOCK_M * BLOCK_K * BLOCK_N fp32 products; tl.dot form: the
# fp32 accumulator and the dequantized weight tile.
_GEMV_PRODUCTS_PER_THREAD = 128
_DOT_ACC_PER_THREAD = 64
_DOT_W_TILE_PER_THREAD = 64


# ----------------------------------------------------------------------------- shared helpers
#
# The kernels call only triton *builtins* (tl.load, tl.dot, tl.full, tl.reduce, ...), never
# the @triton.jit functions of triton's own library (tl.zeros, tl.cdiv, tl.sum, tl.max):
# those are decorated for the compiler or the interpreter once, when triton is first
# imported, and a kernel of the other mode cannot call them.  Keeping to builtins lets
# the launcher run an interpreted copy of this module on CPU tensors in a process whose
# triton was imported for the GPU.


# The kernels' source calls these two by these global names.  Compiled, they are this
# module's own jit functions under those very names: Inductor re-emits a user-defined
# kernel's jit dependencies by their ``__name__``, so an alias (``_SUM = _add``) would be
# undefined in its generated code.  Interpreted, they are triton's own combine functions,
# which the interpreter recognises (by identity) and reduces with numpy.


@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


if not isinstance(_sum_combine, JITFunction):  # decorated for the interpreter
    _sum_combine = getattr(tl.standard, "_sum_combine", _sum_combine)
    _max_combine = getattr(tl.standard, "_elementwise_max", _max_combine)


@triton.jit
def _unpack_plane(row_ptrs, k0, K, mask_n, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32) of one ``WIDTH``-bit plane for K indices
    ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of ``8 // WIDTH``): code ``k`` sits in byte
    ``k // (8 // WIDTH)`` at bit ``(k % (8 // WIDTH)) * WIDTH``.

    Each byte is loaded once, as a ``[BLOCK_K // PER_BYTE, BLOCK_N]`` tile whose pointers
    are contiguous along K (so Triton's coalescing pass vectorizes along the packed row),
    then split into its ``PER_BYTE`` codes and reshaped so that row ``b * PER_BYTE + j``
    is code ``j`` of byte ``b``.
    """
    PER_BYTE: tl.constexpr = 8 // WIDTH
    BYTES: tl.constexpr = BLOCK_K // PER_BYTE
    offs_b = k0 // PER_BYTE + tl.arange(0, BYTES)
    mask = (offs_b[:, None] * PER_BYTE < K) & mask_n[None, :]
    byte = tl.load(row_ptrs + offs_b[:, None], mask=mask, other=0).to(tl.int32)
    if PER_BYTE == 1:
        return byte
    shifts = tl.arange(0, PER_BYTE) * WIDTH
    codes = (byte[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (BLOCK_K, byte.shape[1]))


@triton.jit
def _dequant_tile(
    codes_ptr, scales_ptr, zeros_ptr,
    offs_k, offs_n, k0, K, N, plane1_offset,
    stride_cn, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Dequantized weight tile ``[BLOCK_K, BLOCK_N]`` (fp32, K-major for ``tl.dot``).

    The one unpack/dequant routine of every kernel family.  ``BITS`` picks the bit
    planes exactly as ``packing.plane_widths`` does (8 -> [8], 4 -> [4], 2 -> [2],
    3 -> [2, 1] with the 1-bit plane at ``plane1_offset`` bytes into the row).  When a
    K tile cannot straddle a group (``GROUP_SIZE % BLOCK_K == 0``, tiles start at
    multiples of ``BLOCK_K``) one scale/zero per column is loaded; otherwise (arbitrary
    group sizes, partial groups) each element gathers its own group's scale and zero.
    Out-of-range elements dequantize to 0.
    """
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    row_ptrs = codes_ptr + offs_n[None, :].to(tl.int64) * stride_cn
    kk = offs_k[:, None]
    if BITS == 3:
        codes = _unpack_plane(row_ptrs, k0, K, mask_n, BLOCK_K, 2) | (
            _unpack_plane(row_ptrs + plane1_offset, k0, K, mask_n, BLOCK_K, 1) << 2
        )
    else:
        codes = _unpack_plane(row_ptrs, k0, K, mask_n, BLOCK_K, BITS)
    if GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        zero = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)[None, :]
    else:
        g = kk // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n[None, :] * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + offs_n[None, :] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    return tl.where(mask, (codes.to(tl.float32) - zero) * scale, 0.0)


@triton.jit
def _mma(acc, a, w, USE_DOT: tl.constexpr):
    """``acc += a @ w`` for ``a`` [BLOCK_M, BLOCK_K] (activation dtype) and fp32 ``w``."""
    if USE_DOT:
        if a.dtype == tl.float32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
    else:
        acc += tl.reduce(a.to(tl.float32)[:, :, None] * w[None, :, :], 1, _sum_combine)
    return acc


@triton.jit
def _epilogue(
    acc, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr,
    offs_m, offs_n, M, N, stride_xm, stride_xk, j_start,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, J_STEP: tl.constexpr,
):  # fmt: skip
    """Add the CSR outliers (entries ``j_start, j_start + J_STEP, ...`` of each row) and,
    when ``j_start == 0``, the bias to the fp32 accumulator ``[BLOCK_M, BLOCK_N]``."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_OUTLIERS:
        start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
        count = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        max_count = tl.reduce(count, 0, _max_combine)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        for j in range(j_start, max_count, J_STEP):
            valid = j < count
            col = tl.load(col_idx_ptr + start + j, mask=valid, other=0).to(tl.int64)
            val = tl.load(values_ptr + start + j, mask=valid, other=0.0).to(tl.float32)
            xv = tl.load(x_rows + col[None, :] * stride_xk, mask=mask_m[:, None] & valid[None, :], other=0.0)
            acc += xv.to(tl.float32) * val[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(j_start == 0, bias, 0.0)[None, :]  # one split adds it
    return acc


# ----------------------------------------------------------------------------- small M: GEMV / split-K


@triton.jit
def gwq_splitk_kernel(
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
    """Small-M tile program: ``out`` (fp32, zeroed, ``[M, N]``) += this split's partial."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k_tile in range(pid_k, (K + BLOCK_K - 1) // BLOCK_K, SPLIT_K):
        k0 = k_tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(
            codes_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N, plane1_offset,
            stride_cn, stride_sn, stride_zn, BITS, GROUP_SIZE, BLOCK_K,
        )  # fmt: skip
        acc = _mma(acc, a, w, BLOCK_M >= 16)

    acc = _epilogue(
        acc, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr,
        offs_m, offs_n, M, N, stride_xm, stride_xk, pid_k, HAS_OUTLIERS, HAS_BIAS, SPLIT_K,
    )  # fmt: skip
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


# ----------------------------------------------------------------------------- large M: tiled tl.dot GEMM


@triton.jit
def gwq_gemm_kernel(
    # pointers
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr, out_ptr,
    # sizes (m_bucket only keys the autotune cache)
    M, N, K, plane1_offset, m_bucket,
    # strides
    stride_xm, stride_xk, stride_cn, stride_sn, stride_zn, stride_om,
    # format
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    # tuning
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """Large-M tile program: ``out[BLOCK_M, BLOCK_N]`` tile in the activation dtype."""
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    # GROUP_M row-tiles share their weight column tiles while those are hot in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequant_tile(
            codes_ptr, scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N, plane1_offset,
            stride_cn, stride_sn, stride_zn, BITS, GROUP_SIZE, BLOCK_K,
        )  # fmt: skip
        acc = _mma(acc, a, w, True)

    acc = _epilogue(
        acc, x_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, bias_ptr,
        offs_m, offs_n, M, N, stride_xm, stride_xk, 0, HAS_OUTLIERS, HAS_BIAS, 1,
    )  # fmt: skip
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------- large M: dequantize, then cuBLAS
#
# Measured on an H100 (benchmarks/results/kernel_probe_nvidia-h100-80gb-hbm3.json): at
# M = 2048 on 4096 x 4096 the fused GEMM above takes 3.0 ms with outliers and 0.54 ms
# without them, against 90 us for cuBLAS fp16, while dequantizing to a dense fp16 weight
# and calling cuBLAS took 160 us with a first, naive dequantization kernel.  Prefill is
# compute-bound (68.7 GFLOP against 9.5 MB of packed weight), so re-reading a dense
# weight once per call costs little next to the product, and cuBLAS's product is far
# faster than ours.  These two kernels write that dense weight.


@triton.jit
def _split_bytes(byte, WIDTH: tl.constexpr):
    """``[R, B]`` bytes -> ``[R, B * (8 // WIDTH)]`` codes, code ``j`` of byte ``b`` at column
    ``b * (8 // WIDTH) + j``.  ``tl.join`` puts each new axis innermost, so the codes are
    joined in bit-reversed order (``join(evens, odds)``, recursively) and the reshape is
    then a plain row-major flattening that keeps each byte's codes in one thread."""
    R: tl.constexpr = byte.shape[0]
    B: tl.constexpr = byte.shape[1]
    if WIDTH == 8:
        return byte
    elif WIDTH == 4:
        return tl.reshape(tl.join(byte & 15, byte >> 4), (R, B * 2))
    elif WIDTH == 2:
        c0 = byte & 3
        c1 = (byte >> 2) & 3
        c2 = (byte >> 4) & 3
        c3 = (byte >> 6) & 3
        return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (R, B * 4))
    else:
        c0 = byte & 1
        c1 = (byte >> 1) & 1
        c2 = (byte >> 2) & 1
        c3 = (byte >> 3) & 1
        c4 = (byte >> 4) & 1
        c5 = (byte >> 5) & 1
        c6 = (byte >> 6) & 1
        c7 = (byte >> 7) & 1
        evens = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odds = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        return tl.reshape(tl.join(evens, odds), (R, B * 8))


@triton.jit
def _plane_rows(row_ptrs, k0, K, mask_n, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` (int32) of one plane, rows along N, K contiguous: each
    byte loaded once as a ``[BLOCK_N, BLOCK_K // PER_BYTE]`` tile."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    offs_b = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    mask = mask_n[:, None] & (offs_b[None, :] * PER_BYTE < K)
    return _split_bytes(tl.load(row_ptrs + offs_b[None, :], mask=mask, other=0).to(tl.int32), WIDTH)


@triton.jit
def gwq_dequant_kernel(
    codes_ptr, scales_ptr, zeros_ptr, w_ptr,
    N, K, plane1_offset, stride_cn, stride_sn, stride_zn, stride_wn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Dense ``w[N, K]`` (its dtype) ``= (code - zero) * scale`` for one ``[BLOCK_N, BLOCK_K]``
    tile, computed in fp32.  Outlier positions hold the zero code, so they come out
    exactly 0 and :func:`gwq_scatter_outliers_kernel` can store (not add) the outliers."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    row_ptrs = codes_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    if BITS == 3:
        codes = _plane_rows(row_ptrs, k0, K, mask_n, BLOCK_K, 2) | (_plane_rows(row_ptrs + plane1_offset, k0, K, mask_n, BLOCK_K, 1) << 2)
    else:
        codes = _plane_rows(row_ptrs, k0, K, mask_n, BLOCK_K, BITS)
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies inside one group: one scale and zero per row
        g = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)[:, None]
    else:  # any group size: each element gathers its group's (cached) scale and zero
        g = offs_k[None, :] // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    w = (codes.to(tl.float32) - zero) * scale
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gwq_scatter_outliers_kernel(
    row_ptr_ptr, col_idx_ptr, values_ptr, w_ptr, N, stride_wn, BLOCK_N: tl.constexpr
):  # fmt: skip
    """``w[n, col_idx[j]] = values[j]`` for the CSR entries of ``BLOCK_N`` rows (entry ``j``
    of every row in one step, up to the longest row)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
    count = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
    rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    for j in range(0, tl.reduce(count, 0, _max_combine)):
        valid = j < count
        col = tl.load(col_idx_ptr + start + j, mask=valid, other=0).to(tl.int64)
        val = tl.load(values_ptr + start + j, mask=valid, other=0.0)
        tl.store(rows + col, val.to(w_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- autotune configs + pruners

#: ``True`` when this copy of the module was decorated by the Triton interpreter.
INTERPRETED: bool = not isinstance(gwq_gemm_kernel, JITFunction)


def splitk_configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """Autotune space of :func:`gwq_splitk_kernel` (``BLOCK_M`` comes from the launcher).

    Under the interpreter: one config, so nothing is ever benchmarked on CPU (it uses
    ``SPLIT_K=2`` so the atomic split-K reduction is what the CPU tests exercise).
    """
    if interpreted:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}, num_warps=4)]
    tiles = [(32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]
    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps, num_stages=2)
        for split in (1, 2, 4)
        for bn, bk, warps in tiles
    ]
    configs += [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 8}, num_warps=warps, num_stages=2)
        for bn, bk, warps in [(32, 128, 4), (64, 64, 4), (64, 128, 4)]
    ]
    return configs


def gemm_configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """Autotune space of :func:`gwq_gemm_kernel` (one config under the interpreter)."""
    if interpreted:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    configs = []
    for block_m, block_n, block_k, stages, warps in [
        (128, 128, 32, 3, 8), (128, 128, 64, 3, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
        (64, 128, 64, 3, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4),
        (32, 128, 64, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2), (32, 64, 128, 3, 4),
    ]:  # fmt: skip
        configs.append(
            triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        )
    return configs


def dequant_configs(interpreted: bool = INTERPRETED) -> list[triton.Config]:
    """Autotune space of :func:`gwq_dequant_kernel` (one config under the interpreter)."""
    if interpreted:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in [(32, 128, 4), (64, 128, 4), (128, 128, 8), (64, 64, 4), (128, 64, 4), (16, 256, 4), (32, 256, 4)]
    ]


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _prefer_group_aligned(configs: list[triton.Config], group_size: int) -> list[triton.Config]:
    """Keep configs whose K tile never straddles a group (one scale load per tile) when
    there are any; arbitrary group sizes fall back to the per-element gather path."""
    aligned = [c for c in configs if group_size % c.kwargs["BLOCK_K"] == 0]
    return aligned or configs


def _fits_registers(block_m: int, c: triton.Config) -> bool:
    threads = 32 * c.num_warps
    bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    if block_m < 16:  # GEMV form
        return block_m * bk * bn <= _GEMV_PRODUCTS_PER_THREAD * threads
    return block_m * bn <= _DOT_ACC_PER_THREAD * threads and bk * bn <= _DOT_W_TILE_PER_THREAD * threads


def prune_splitk_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop split-K configs that cannot pay off for this shape (never returns an empty list).

    * tiles that would spill registers (see the budgets at the top of this module);
    * ``BLOCK_K`` / ``BLOCK_N`` far beyond K / N only add masked work;
    * more splits than K tiles leave programs idle;
    * prefer tiles that do not straddle a quantization group.
    """
    args = {**named_args, **kwargs}
    n, k, block_m, group_size = args["N"], args["K"], args["BLOCK_M"], args["GROUP_SIZE"]
    kept = []
    for c in configs:
        bn, bk, split = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        if bk > max(32, _next_pow2(k)) or bn > max(32, _next_pow2(n)):
            continue
        if split > 1 and split > math.ceil(k / bk):
            continue
        if not _fits_registers(block_m, c):
            continue
        kept.append(c)
    if not kept:  # tiny shapes: the smallest tile
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]))]
    return _prefer_group_aligned(kept, group_size)


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop GEMM configs that spill or whose tiles are far larger than the problem
    (never returns an empty list); prefer tiles that do not straddle a group."""
    args = {**named_args, **kwargs}
    m, n, k, group_size = args["m_bucket"], args["N"], args["K"], args["GROUP_SIZE"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(32, m)
        and c.kwargs["BLOCK_N"] <= max(32, _next_pow2(n))
        and c.kwargs["BLOCK_K"] <= max(32, _next_pow2(k))
        and _fits_registers(c.kwargs["BLOCK_M"], c)
    ]
    if not kept:
        kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]
    return _prefer_group_aligned(kept, group_size)


#: The autotuned entry points the launcher calls when no explicit config is given.  The
#: cache key holds everything the best tile depends on; ``reset_to_zero`` keeps the
#: atomically accumulated split-K workspace clean between benchmark runs.
gwq_splitk_autotuned = triton.autotune(
    configs=splitk_configs(),
    key=["N", "K", "BLOCK_M", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_splitk_configs},
    reset_to_zero=["out_ptr"],
)(gwq_splitk_kernel)

gwq_dequant_autotuned = triton.autotune(
    configs=dequant_configs(),
    key=["N", "K", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: _prefer_group_aligned(configs, {**named_args, **kw}["GROUP_SIZE"])},
)(gwq_dequant_kernel)

gwq_gemm_autotuned = triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "m_bucket", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_gemm_configs},
)(gwq_gemm_kernel)
