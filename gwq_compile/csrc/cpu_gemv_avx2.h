// Decode GEMV for CPUs without AVX512-BF16 (AVX2 + FMA): y[n] = sum_k w[n, k] x[k] straight
// from torch's int4 CPU packing, in fp32 with exact codes.
//
// Why: on an AVX2 CPU torch's int4 GEMM takes bf16 activations it cannot multiply natively,
// and SmolLM2's decode ran at 1.45x FP32 through it (0.78x a bf16 model): slower per
// weight than the bf16 dense GEMV it is meant to beat.  Reading 4 bits a weight should
// make decode about as fast as the memory allows.
//
// How: both of torch's orders split a 64-row block into "chunks" of 16 bytes per column,
// byte b holding row r_low + b in its low nibble and r_high + b in its high one:
//   * AVX2 order: chunk s (0, 1) is the 32-row sub-block s, stored column after column
//     (16 bytes each) at s * 16 * columns; r_low = 32 s, r_high = 32 s + 16;
//   * AVX-512 order: column k of the block is 32 bytes at 32 k; chunk c is its half c;
//     r_low = 16 c, r_high = 32 + 16 c.
// Per column, each chunk's nibbles become four 8-lane fp32 vectors (zero-extend, convert)
// that are multiplied by the broadcast x[k] and accumulated (8 accumulators for the 64
// rows, so 8 FMA chains run at once).  Each group applies its grid once:
//     sum_k w x = scale * (D - 8 X) + zero * X,   D = sum_k q x,   X = sum_k x.
// x is fp32 (not rounded to bf16 as for torch's kernel), so this path is exact up to fp32
// rounding.  The caller multiplies every row of x with a block while it is in cache.

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

  // First row of block_dot's 8-lane vector j (0, 1: low nibbles; 2, 3: high) of chunk c.
  int row(int c, int j) const { return (j < 2 ? r_low[c] : r_high[c]) + 8 * (j % 2); }
};

// The sum of x over each tile group (X above).
inline void group_sums(const float* x, int64_t columns, int64_t tile_group, float* sums) {
  for (int64_t g = 0; g * tile_group < columns; ++g) {
    float s = 0.f;
    for (int64_t k = g * tile_group; k < (g + 1) * tile_group; ++k) s += x[k];
    sums[g] = s;
  }
}

// y[0:64] of one 64-row block for one row x of the activations (fp32, kernel columns);
// grid = the block's bf16 (scale, zero) pairs, group g's at grid + g * grid_group_stride.
GWQ_TARGET_AVX2
inline void block_dot(
    const uint8_t* __restrict__ block, const Chunks& chunks, const uint16_t* __restrict__ grid, int64_t grid_group_stride,
    const float* __restrict__ x, const float* __restrict__ sums, int64_t columns, int64_t tile_group, float* __restrict__ y) {
  const __m128i low_nibble = _mm_set1_epi8(0x0F);
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  // out[c][j]: chunk c; j = 0, 1 low rows r_low + 8 j .. +7; j = 2, 3 high rows r_high + 8 (j - 2) ..
  __m256 out[2][4];
  for (int c = 0; c < 2; ++c)
    for (int j = 0; j < 4; ++j) out[c][j] = _mm256_setzero_ps();
  const int64_t groups = columns / tile_group;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[2][4];
    for (int c = 0; c < 2; ++c)
      for (int j = 0; j < 4; ++j) acc[c][j] = _mm256_setzero_ps();
    const int64_t k_end = (g + 1) * tile_group;
    for (int64_t k = g * tile_group; k < k_end; ++k) {
      const __m256 xv = _mm256_broadcast_ss(x + k);
      for (int c = 0; c < 2; ++c) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + chunks.base[c] + k * chunks.col_stride));
        const __m128i lo = _mm_and_si128(b, low_nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low_nibble);
        acc[c][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), xv, acc[c][0]);
        acc[c][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), xv, acc[c][1]);
        acc[c][2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), xv, acc[c][2]);
        acc[c][3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), xv, acc[c][3]);
      }
    }
    const uint16_t* sz = grid + g * grid_group_stride;
    const __m256 x_sum = _mm256_set1_ps(sums[g]), offset = _mm256_set1_ps(8.f * sums[g]);
    for (int c = 0; c < 2; ++c) {
      for (int j = 0; j < 4; ++j) {
        const int row = chunks.row(c, j);
        const __m256i pair = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 2 * row));  // 8 (scale, zero) bf16 pairs
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
        const __m256 zero = _mm256_castsi256_ps(_mm256_and_si256(pair, high_half));
        out[c][j] = _mm256_fmadd_ps(scale, _mm256_sub_ps(acc[c][j], offset), _mm256_fmadd_ps(zero, x_sum, out[c][j]));
      }
    }
  }
  for (int c = 0; c < 2; ++c) {
    for (int j = 0; j < 4; ++j) {
      const int row = chunks.row(c, j);
      _mm256_storeu_ps(y + row, out[c][j]);
    }
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
