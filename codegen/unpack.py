"""The one unpack/dequantize helper of every GWQ Triton kernel family.

:func:`dequant_tile` turns a ``[BLOCK_N, BLOCK_K]`` tile of the stored bit-plane format of
:mod:`gwq_compile.packing` (rows along N, codes contiguous along K inside each row, read
that module for the format) into fp32 weights ``(code - zero) * scale``.  The GEMV
(:mod:`gwq_compile.codegen.gemv`) and the dense path (:mod:`gwq_compile.codegen.dequant`)
both call it, so bit width, group size and the edge masks are handled in one place; a
bit width is a ``tl.constexpr``, not a new kernel.

Why this shape of tile: a packed row is contiguous along K, so loading the bytes as a
``[BLOCK_N, BLOCK_K // PER_BYTE]`` tile with K innermost lets Triton's coalescing pass
give each thread consecutive bytes (vector loads), and splitting each byte into its
codes with ``tl.join`` keeps those codes in the thread that loaded the byte (no
shuffles), with the result again contiguous along K (vector stores in the dense path).

The helpers call only triton *builtins* (tl.load, tl.join, tl.reduce, ...), never the
``@triton.jit`` functions of triton's own library (tl.zeros, tl.sum, tl.max): those are
decorated for the compiler or the interpreter once, when triton is imported, and a
kernel of the other mode cannot call them.  Keeping to builtins lets the launcher run an
interpreted copy of these modules on CPU tensors in a process whose triton was imported
for the GPU (see :func:`gwq_compile.codegen.kernel_modules.kernel_modules`).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gwq_compile.codegen needs the `triton` package (pip install 'triton>=3.3'); without it use GWQ_KERNEL=reference"
    ) from exc

from triton.runtime.jit import JITFunction

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


#: ``True`` when this copy of the module was decorated by the Triton interpreter.
INTERPRETED: bool = not isinstance(_sum_combine, JITFunction)

if INTERPRETED:
    _sum_combine = getattr(tl.standard, "_sum_combine", _sum_combine)
    _max_combine = getattr(tl.standard, "_elementwise_max", _max_combine)


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
def _plane_codes(row_ptrs, k0, K, mask_n, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` (int32) of one ``WIDTH``-bit plane for K indices
    ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of ``8 // WIDTH``): each byte loaded once."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    offs_b = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
    mask = mask_n[:, None] & (offs_b[None, :] * PER_BYTE < K)
    return _split_bytes(tl.load(row_ptrs + offs_b[None, :], mask=mask, other=0).to(tl.int32), WIDTH)


@triton.jit
def dequant_tile(
    codes_ptr, scales_ptr, zeros_ptr,
    offs_n, k0, N, K, plane1_offset, stride_cn, stride_sn, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Dequantized weight tile ``[BLOCK_N, BLOCK_K]`` (fp32) of rows ``offs_n`` and columns
    ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of ``BLOCK_K``, ``BLOCK_K >= 8``).

    ``BITS`` picks the bit planes exactly as ``packing.plane_widths`` does (8 -> [8],
    4 -> [4], 2 -> [2], 3 -> [2, 1] with the 1-bit plane ``plane1_offset`` bytes into the
    row).  When a tile cannot straddle a group (``GROUP_SIZE % BLOCK_K == 0``) one scale
    and zero per row is loaded; otherwise (any group size, partial last groups) each
    element gathers its group's (cached) scale and zero.  Out-of-range elements are 0;
    outlier positions hold the zero code, so they are exactly 0 too.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k[None, :] < K)
    row_ptrs = codes_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    if BITS == 3:
        codes = _plane_codes(row_ptrs, k0, K, mask_n, BLOCK_K, 2) | (_plane_codes(row_ptrs + plane1_offset, k0, K, mask_n, BLOCK_K, 1) << 2)
    else:
        codes = _plane_codes(row_ptrs, k0, K, mask_n, BLOCK_K, BITS)
    if GROUP_SIZE % BLOCK_K == 0:  # the tile lies inside one group: one scale and zero per row
        g = k0 // GROUP_SIZE
        in_k = mask_n & ((offs_n * 0 + k0) < K)  # a dense program's last tiles may start past K: no group there
        scale = tl.load(scales_ptr + offs_n * stride_sn + g, mask=in_k, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=in_k, other=0).to(tl.float32)[:, None]
    else:
        g = offs_k[None, :] // GROUP_SIZE
        scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    return tl.where(mask, (codes.to(tl.float32) - zero) * scale, 0.0)
