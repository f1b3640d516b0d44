// Decode GEMV for CPUs without AVX512-BF16 (AVX2 + FMA): y[n] = sum_k w[n, k] x[k] straight
// from torch's int4 CPU packing, with exact codes and integer multiply-adds.
//
// Why: on an AVX2 CPU torch's int4 GEMM takes bf16 activations it cannot multiply natively,
// and SmolLM2's decode ran at 1.45x FP32 through it (0.78x a bf16 model): slower per
// weight than the bf16 dense GEMV it is meant to beat.  A first fp32 form of this GEMV
// (zero-extend each nibble to an fp32 lane, FMA) was bound by those conversions: ~11 G
// multiply-adds/s a core, so it read its 4-bit weights at a third of the memory's speed.
//
// How: both of torch's orders split a 64-row block into "chunks" of 16 bytes per column,
// byte b holding row r_low + b in its low nibble and r_high + b in its high one:
//   * AVX2 order: chunk s (0, 1) is the 32-row sub-block s, stored column after column
//     (16 bytes each) at s * 16 * columns; r_low = 32 s, r_high = 32 s + 16;
//   * AVX-512 order: column k of the block is 32 bytes at 32 k; chunk c is its half c;
//     r_low = 16 c, r_high = 32 + 16 c.
// x is rounded to int16 per tile group (quantize_x: 2**-16 of the group's largest |x|), and
// block_dot_i16 multiplies two columns at a time with _mm256_madd_epi16 into exact int32
// sums per row.  Each group applies its grid once:
//     sum_k w x = step * (scale * (D - 8 X) + zero * X),   D = sum_k q xq,   X = sum_k xq.
// The caller multiplies every row of x with a block while it is in cache.

#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gwq_gemv_avx2 {

#define GWQ_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

constexpr int kRows = 64;  // rows per block of the packed operand (cpu_layout.BLOCK_N)

inline bool supported() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}

// Where a chunk of a block lives (see the module comment).
struct Chunks {
  int64_t base[2];     // byte offset of chunk c's column 0 within the block
  int64_t col_stride;  // bytes from one column of a chunk to the next
  int r_low[2], r_high[2];

  static Chunks avx2_order(int64_t columns) { return {{0, 16 * columns}, 16, {0, 32}, {16, 48}}; }
  static Chunks avx512_order() { return {{0, 16}, 32, {0, 16}, {32, 48}}; }

  // First row of block_dot_i16's 8-lane output vector j (0, 1: low nibbles; 2, 3: high) of chunk c.
  int row(int c, int j) const { return (j < 2 ? r_low[c] : r_high[c]) + 8 * (j % 2); }
};

// x rounded to int16 per tile group, the form block_dot_i16 multiplies: x[k] ~= step[g] * xq[k]
// with step[g] = max_k |x[k]| / 32767 over group g, and qsum[g] = sum_k xq[k] (X above, exact).
// A group holding a NaN or an infinity gets step NaN, so its rows come out NaN as in fp32.
GWQ_TARGET_AVX2
inline void quantize_x(const float* __restrict__ x, int64_t columns, int64_t tile_group, int16_t* __restrict__ xq, float* __restrict__ step, int32_t* __restrict__ qsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g * tile_group < columns; ++g) {
    const float* xg = x + g * tile_group;
    int16_t* qg = xq + g * tile_group;
    __m256 amax = _mm256_setzero_ps();
    bool finite = true;
    for (int64_t k = 0; k < tile_group; k += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + k));
      finite = finite && _mm256_movemask_ps(_mm256_cmp_ps(a, _mm256_set1_ps(3.4e38f), _CMP_LE_OQ)) == 0xFF;  // false for NaN/inf
      amax = _mm256_max_ps(amax, a);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax);
    float m = 0.f;
    for (float v : lanes) m = v > m ? v : m;
    if (!finite || !(m > 1e-30f)) {  // all (nearly) zero: the group adds nothing; NaN/inf: it poisons its rows
      for (int64_t k = 0; k < tile_group; ++k) qg[k] = 0;
      step[g] = finite ? 0.f : __builtin_nanf("");
      qsum[g] = 0;
      continue;
    }
    const __m256 inv = _mm256_set1_ps(32767.f / m);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t k = 0; k < tile_group; k += 16) {  // tile groups are multiples of 32 columns
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inv));  // round to nearest
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8), inv));
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
      // packs interleaves its operands' 128-bit lanes; the permute restores k order
      const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qg + k), q);
    }
    alignas(32) int32_t s[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(s), sum);
    qsum[g] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    step[g] = m / 32767.f;
  }
}

// y[0:64] of one 64-row block for one row x of the activations, given as quantize_x's
// (xq, step, qsum) over the kernel columns; grid = the block's bf16 (scale, zero) pairs,
// group g's at grid + g * grid_group_stride.  Two columns at a time: per chunk, the 16 bytes
// of column k and of k + 1 are shuffled into (code_k, code_k+1) int16 pairs per row, and
// _mm256_madd_epi16 against (xq[k], xq[k+1]) adds both products into the row's int32 sum
// (exact: |sum| <= 256 * 15 * 32767 < 2**31 over a tile group of at most 256 columns).
// 16 instructions per 64 multiply-adds where the fp32 form took 38 (zero-extend, convert,
// FMA per 8), so it runs ~2x as fast, and x is kept to 2**-16 of its group's largest entry
// (bf16 keeps 2**-9 of each entry).
template <bool kPairContiguous>
GWQ_TARGET_AVX2
inline void block_dot_i16(
    const uint8_t* __restrict__ block, const Chunks& chunks, const uint16_t* __restrict__ grid, int64_t grid_group_stride,
    const int16_t* __restrict__ xq, const float* __restrict__ step, const int32_t* __restrict__ qsum, int64_t columns,
    int64_t tile_group, float* __restrict__ y) {
  const __m256i low_nibble = _mm256_set1_epi16(0x0F);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  // Per 128-bit lane of the permuted pair [col k rows 8h..8h+7, col k+1 rows 8h..8h+7]:
  // int16 lanes (code_k, code_k+1) of rows 8h + 0..3 (pairs0) and 8h + 4..7 (pairs1).
  const __m256i pairs0 = _mm256_setr_epi8(
      0, -128, 8, -128, 1, -128, 9, -128, 2, -128, 10, -128, 3, -128, 11, -128,
      0, -128, 8, -128, 1, -128, 9, -128, 2, -128, 10, -128, 3, -128, 11, -128);
  const __m256i pairs1 = _mm256_setr_epi8(
      4, -128, 12, -128, 5, -128, 13, -128, 6, -128, 14, -128, 7, -128, 15, -128,
      4, -128, 12, -128, 5, -128, 13, -128, 6, -128, 14, -128, 7, -128, 15, -128);
  __m256 out[2][4];
  for (int c = 0; c < 2; ++c)
    for (int j = 0; j < 4; ++j) out[c][j] = _mm256_setzero_ps();
  const int64_t groups = columns / tile_group;
  for (int64_t g = 0; g < groups; ++g) {
    // acc[c][0]: low-nibble rows r_low + {0-3, 8-11}; [1]: r_low + {4-7, 12-15}; [2], [3]: the same of r_high
    __m256i acc[2][4];
    for (int c = 0; c < 2; ++c)
      for (int j = 0; j < 4; ++j) acc[c][j] = _mm256_setzero_si256();
    const int64_t k_end = (g + 1) * tile_group;
    for (int64_t k = g * tile_group; k < k_end; k += 2) {
      int32_t pair;
      __builtin_memcpy(&pair, xq + k, sizeof(pair));  // (xq[k], xq[k + 1]) as one int32: low half xq[k]
      const __m256i xv = _mm256_set1_epi32(pair);
      for (int c = 0; c < 2; ++c) {
        const uint8_t* col = block + chunks.base[c] + k * chunks.col_stride;
        __m256i v;
        if constexpr (kPairContiguous) {
          v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
        } else {
          v = _mm256_inserti128_si256(
              _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(col))),
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(col + chunks.col_stride)), 1);
        }
        v = _mm256_permute4x64_epi64(v, 0xD8);  // lane h: bytes 8h..8h+7 of column k, then of column k + 1
        const __m256i s0 = _mm256_shuffle_epi8(v, pairs0), s1 = _mm256_shuffle_epi8(v, pairs1);
        acc[c][0] = _mm256_add_epi32(acc[c][0], _mm256_madd_epi16(_mm256_and_si256(s0, low_nibble), xv));
        acc[c][1] = _mm256_add_epi32(acc[c][1], _mm256_madd_epi16(_mm256_and_si256(s1, low_nibble), xv));
        acc[c][2] = _mm256_add_epi32(acc[c][2], _mm256_madd_epi16(_mm256_srli_epi16(s0, 4), xv));
        acc[c][3] = _mm256_add_epi32(acc[c][3], _mm256_madd_epi16(_mm256_srli_epi16(s1, 4), xv));
      }
    }
    // sum_k w x = step * (scale * (D - 8 X) + zero * X) per row, D = sum_k q xq, X = qsum[g]
    const uint16_t* sz = grid + g * grid_group_stride;
    const __m256i x8 = _mm256_set1_epi32(8 * qsum[g]);
    const __m256 x_sum = _mm256_set1_ps(static_cast<float>(qsum[g])), st = _mm256_set1_ps(step[g]);
    for (int c = 0; c < 2; ++c) {
      for (int h = 0; h < 2; ++h) {  // h = 0: low-nibble rows, 1: high-nibble rows
        const __m256i a = acc[c][2 * h], b = acc[c][2 * h + 1];
        const __m256i rows[2] = {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};  // rows +0..7, +8..15
        for (int i = 0; i < 2; ++i) {
          const int j = 2 * h + i;
          const int row = chunks.row(c, j);
          const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 2 * row));  // 8 (scale, zero) bf16 pairs
          const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
          const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, high_half));
          const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(rows[i], x8));
          out[c][j] = _mm256_fmadd_ps(_mm256_fmadd_ps(scale, d, _mm256_mul_ps(zero, x_sum)), st, out[c][j]);
        }
      }
    }
  }
  for (int c = 0; c < 2; ++c) {
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + chunks.row(c, j), out[c][j]);
  }
}

// One column k of a 64-row block dequantized to fp32 for the prefill tiles:
// out[n] = q[n] * scale[n] + offset[n] (offset = zero - 8 scale), rows in natural order.
GWQ_TARGET_AVX2
inline void dequant_column_f32(
    const uint8_t* __restrict__ block, const Chunks& chunks, int64_t k, const float* __restrict__ scale, const float* __restrict__ offset,
    float* __restrict__ out) {
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  for (int c = 0; c < 2; ++c) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + chunks.base[c] + k * chunks.col_stride));
    const __m128i halves[2] = {_mm_and_si128(b, low_nibble), _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble)};
    for (int h = 0; h < 2; ++h) {
      const int r = h == 0 ? chunks.r_low[c] : chunks.r_high[c];
      const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
      const __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
      _mm256_storeu_ps(out + r, _mm256_fmadd_ps(q0, _mm256_loadu_ps(scale + r), _mm256_loadu_ps(offset + r)));
      _mm256_storeu_ps(out + r + 8, _mm256_fmadd_ps(q1, _mm256_loadu_ps(scale + r + 8), _mm256_loadu_ps(offset + r + 8)));
    }
  }
}

}  // namespace gwq_gemv_avx2
