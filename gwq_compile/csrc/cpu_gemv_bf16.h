// Decode GEMV (one row of x) straight from torch's int4 CPU packing, with AVX512-BF16 dot
// products: y[n] = sum_k ((q[n, k] - 8) * scale[g, n] + zero[g, n]) * bf16(x[k]).
//
// Why: at M = 1 torch's own int4 GEMM (_weight_int4pack_mm_for_cpu) runs at about the speed of
// an fp32 sgemv on SmolLM2's 576-wide layers (30 us for 576 x 576 here), far from what
// reading 4 bits per weight allows.  This kernel reads the same operand (codes, bf16 grid),
// so nothing new is resident, and computes with the same numbers: x rounded to bf16, exact
// integer codes, fp32 accumulation.
//
// How: in the AVX-512 packing each column k of a 64-row block is 32 bytes, byte b holding
// row b (low nibble) and row b + 32 (high nibble).  Two 512-bit loads cover columns k..k+3;
// interleaving their 16-bit words pairs column k with k + 2 (and k + 1 with k + 3) in every
// 32-bit lane, which is the pair vdpbf16ps multiplies and adds.  A nibble q becomes the bf16
// number 128 + q by OR-ing it into the mantissa of bf16(128) = 0x4300 (exact for q < 128), so
// each group accumulates D = sum (128 + q) x and then applies
//     sum_k w x = scale * (D - 136 X) + zero * X,   X = sum_k x   (136 = 128 + 8),
// which is exact algebra; D's rounding error is a few fp32 ulps of |128 x|.  The lanes hold
// the rows in a fixed permutation (row_of below); the scales are permuted to match per group
// and the 64 results scattered back once per block.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gwq_gemv {

#define GWQ_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

constexpr int kRows = 64;  // rows per block of torch's packing (cpu_layout.BLOCK_N)

inline bool supported() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16") &&
        __builtin_cpu_supports("f16c");
  }();
  return ok;
}

// Row of output lane e (0..15) of accumulator i (nibble position 0..3) after the lane halves
// are folded (see the module comment): lanes 0-7 come from the low word interleave, 8-15
// from the high one.
constexpr int row_of(int i, int e) {
  return 16 * ((e % 8) / 4) + 2 * (4 * (e / 8) + e % 4) + (i == 0 ? 0 : i == 1 ? 32 : i == 2 ? 1 : 33);
}

// x as the kernel reads it: for every 4 kernel columns k..k+3, sixteen 32-bit lanes holding
// the bf16 pairs (x[k], x[k+2]) in lanes 0-7 and (x[k+1], x[k+3]) in lanes 8-15; and the sum
// of the bf16-rounded x per tile group.  columns % 4 == 0 and tile_group % 4 == 0.
inline void arrange_x(const uint16_t* xk, int64_t columns, int64_t tile_group, uint32_t* pairs, float* group_sums) {
  for (int64_t k = 0; k < columns; k += 4) {
    uint32_t* p = pairs + (k / 4) * 16;
    const uint32_t even = static_cast<uint32_t>(xk[k]) | (static_cast<uint32_t>(xk[k + 2]) << 16);
    const uint32_t odd = static_cast<uint32_t>(xk[k + 1]) | (static_cast<uint32_t>(xk[k + 3]) << 16);
    for (int j = 0; j < 8; ++j) {
      p[j] = even;
      p[j + 8] = odd;
    }
  }
  for (int64_t g = 0; g * tile_group < columns; ++g) {
    float s = 0.f;
    for (int64_t k = g * tile_group; k < (g + 1) * tile_group; ++k) {
      const uint32_t bits = static_cast<uint32_t>(xk[k]) << 16;
      float v;
      __builtin_memcpy(&v, &bits, 4);
      s += v;
    }
    group_sums[g] = s;
  }
}

// y[0:64] of one 64-row block: block = its codes (columns * 32 bytes), grid = the bf16
// (scale, zero) pairs, group g's pairs for this block at grid + g * grid_group_stride.
GWQ_TARGET_AVX512_BF16
inline void block_dot(
    const uint8_t* __restrict__ block, const uint16_t* __restrict__ grid, int64_t grid_group_stride, const uint32_t* __restrict__ pairs,
    const float* __restrict__ group_sums, int64_t columns, int64_t tile_group, float* __restrict__ y) {
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  const __m512i bf16_128 = _mm512_set1_epi32(0x43004300);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  // Permutations taking natural-order scales (two vectors: rows 0-31 or 32-63) to lane order.
  alignas(64) int32_t perm_even[16], perm_odd[16];
  for (int e = 0; e < 16; ++e) {
    perm_even[e] = row_of(0, e);  // rows of i = 0 (and of i = 1, minus 32)
    perm_odd[e] = row_of(2, e);   // rows of i = 2 (and of i = 3, minus 32)
  }
  const __m512i p_even = _mm512_load_si512(perm_even), p_odd = _mm512_load_si512(perm_odd);
  __m512 out[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  const int64_t groups = columns / tile_group;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = _mm512_setzero_ps();
    const int64_t k_end = (g + 1) * tile_group;
    for (int64_t k = g * tile_group; k < k_end; k += 4) {
      const __m512i a = _mm512_loadu_si512(block + k * 32);       // columns k, k+1
      const __m512i b = _mm512_loadu_si512(block + k * 32 + 64);  // columns k+2, k+3
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(pairs + (k / 4) * 16);
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_ternarylogic_epi32(lo, nibbles, bf16_128, 0xEA), xv);
      acc[1] = _mm512_dpbf16_ps(acc[1], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 4), nibbles, bf16_128, 0xEA), xv);
      acc[2] = _mm512_dpbf16_ps(acc[2], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 8), nibbles, bf16_128, 0xEA), xv);
      acc[3] = _mm512_dpbf16_ps(acc[3], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 12), nibbles, bf16_128, 0xEA), xv);
      acc[4] = _mm512_dpbf16_ps(acc[4], (__m512bh)_mm512_ternarylogic_epi32(hi, nibbles, bf16_128, 0xEA), xv);
      acc[5] = _mm512_dpbf16_ps(acc[5], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(hi, 4), nibbles, bf16_128, 0xEA), xv);
      acc[6] = _mm512_dpbf16_ps(acc[6], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(hi, 8), nibbles, bf16_128, 0xEA), xv);
      acc[7] = _mm512_dpbf16_ps(acc[7], (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(hi, 12), nibbles, bf16_128, 0xEA), xv);
    }
    // This group's (scale, zero) of rows 0-63 in natural order, as fp32.
    const uint16_t* sz = grid + g * grid_group_stride;
    __m512 scale[4], zero[4];
    for (int r = 0; r < 4; ++r) {
      const __m512i pair = _mm512_loadu_si512(sz + 32 * r);
      scale[r] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      zero[r] = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));
    }
    const __m512 x_sum = _mm512_set1_ps(group_sums[g]), offset = _mm512_set1_ps(136.f * group_sums[g]);
    for (int i = 0; i < 4; ++i) {
      // Fold lanes 8-15 (columns k+1, k+3) onto 0-7 (k, k+2): same rows.  Low interleave's
      // folded lanes first, then the high one's: the order row_of describes.
      const __m512 u = _mm512_shuffle_f32x4(acc[i], acc[i + 4], _MM_SHUFFLE(1, 0, 1, 0));
      const __m512 v = _mm512_shuffle_f32x4(acc[i], acc[i + 4], _MM_SHUFFLE(3, 2, 3, 2));
      const __m512 d = _mm512_sub_ps(_mm512_add_ps(u, v), offset);
      const __m512i perm = (i % 2 == 0) ? (i == 0 ? p_even : p_odd) : (i == 1 ? p_even : p_odd);
      const int base = (i == 0 || i == 2) ? 0 : 2;  // rows 0-31 or 32-63
      const __m512 s = _mm512_permutex2var_ps(scale[base], perm, scale[base + 1]);
      const __m512 z = _mm512_permutex2var_ps(zero[base], perm, zero[base + 1]);
      out[i] = _mm512_fmadd_ps(s, d, _mm512_fmadd_ps(z, x_sum, out[i]));
    }
  }
  alignas(64) float lanes[16];
  for (int i = 0; i < 4; ++i) {
    _mm512_store_ps(lanes, out[i]);
    for (int e = 0; e < 16; ++e) y[row_of(i, e)] = lanes[e];
  }
}

// One column k of a 64-row block of codes, dequantized to bf16 for the prefill tiles:
// out[n] = bf16((q[n] - 8) * scale[n] + zero[n]), with offset[n] = zero[n] - 8 scale[n];
// bytes = the column's 32 bytes (row b low nibble, row b + 32 high nibble).
GWQ_TARGET_AVX512_BF16
inline void dequant_column_bf16(const uint8_t* __restrict__ bytes, const float* __restrict__ scale, const float* __restrict__ offset, uint16_t* __restrict__ out) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i halves[2] = {_mm256_and_si256(b, low), _mm256_and_si256(_mm256_srli_epi16(b, 4), low)};
  for (int h = 0; h < 2; ++h) {  // rows 0-31 (low nibbles), 32-63 (high nibbles)
    __m512 v[2];
    for (int q = 0; q < 2; ++q) {
      const __m128i bytes16 = q == 0 ? _mm256_castsi256_si128(halves[h]) : _mm256_extracti128_si256(halves[h], 1);
      const int r = 32 * h + 16 * q;
      v[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16)), _mm512_loadu_ps(scale + r), _mm512_loadu_ps(offset + r));
    }
    _mm512_storeu_si512(out + 32 * h, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  }
}

// prod[j] = half(val[j]) * x[col[j]] for j < count: one block's CSR outliers times x, sixteen
// at a time (a gather from x; the tail masked).  The caller sums them per row.
template <typename index_t>
GWQ_TARGET_AVX512_BF16 inline void outlier_products(
    const uint16_t* __restrict__ val, const index_t* __restrict__ col, const float* __restrict__ x, int64_t count, float* __restrict__ prod) {
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = count - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (count - j)) - 1);
    __m512i idx;
    if constexpr (sizeof(index_t) == 2) {
      idx = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, col + j));
    } else {
      idx = _mm512_maskz_loadu_epi32(m, col + j);
    }
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, x, 4);
    const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, val + j));
    _mm512_mask_storeu_ps(prod + j, m, _mm512_mul_ps(v, xv));
  }
}

}  // namespace gwq_gemv
