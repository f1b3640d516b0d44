// The CPU fast path of a GWQ linear in one call: torch's int4 CPU GEMM on the bulk of the
// weight, then the fp16 CSR outliers and the bias added in the same pass that writes the
// output in the activation's dtype.  Registered as torch.ops.gwq_cpu.linear; the Python
// side (gwq_compile/cpu_kernels.py) builds this file on first use and checks it against
// the plain-PyTorch reference in the tests.
//
// y = int4mm(bf16(x'), codes, tile_group, scales_zeros)[:, :N]      (bf16, fp32 accumulation)
// out[m, n] = y[m, n] + sum_{j in row n} x[m, col[j]] * val[j] + bias[n]   (fp32, one rounding)
//
// x' is x rounded to bf16, zero-padded to the kernel's K (or gathered when groups are padded
// inside a row) and repeated twice along K for 8-bit codes (high and low nibbles).  The
// outliers read x itself, in fp32.
//
// From tile_min_rows rows of x on (prefill; cpu_layout.TILE_MIN_ROWS, chosen by benchmarks/cpu_kernels.py), torch's int4 GEMM is about 2x slower than an fp32
// sgemm here, so the weight is instead dequantized one 64-row block at a time into an fp32
// tile that stays in cache (codes, bf16 grid and outliers: the same weight), and multiplied
// by fp32 x' with at::mm: the dense weight is never built whole, and x is not rounded.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_gemv_avx2.h"
#include "cpu_gemv_bf16.h"

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace {

// Calls per path (the tests' proof of which one ran; relaxed atomics cost nothing per call).
enum Path { kGemv = 0, kInt4 = 1, kTile = 2 };
std::atomic<int64_t> path_calls[3];

constexpr int64_t kBlockN = 64;     // rows per block of the packed operand (cpu_layout.BLOCK_N)
constexpr int64_t kTileBlocks = 4;  // blocks per fp32 tile: 256 output columns per at::mm (benchmarks/cpu_kernels.py)

// Where code (n, k) of a [kBlockN, columns] block lands in torch's int4 CPU packing, read off
// torch's own packing routine (the order depends on the CPU capability it dispatched to), as
// cpu_layout.nibble_map does; stored k-major ([columns, kBlockN]) for the tile loop.
struct NibbleMap {
  std::vector<int32_t> byte;
  std::vector<uint8_t> shift;
  // torch's AVX-512 order: the 64 codes of column k are the 32 bytes at k * 32, low nibbles
  // rows 0-31, high nibbles rows 32-63; then the tile loop unpacks without a gather.
  bool split_halves = false;
  // torch's AVX2 order: two 32-row sub-blocks, each 16 bytes per column (row b low nibble,
  // row b + 16 high), one after the other.
  bool avx2_halves = false;
  // How cpu_gemv_avx2.h reads this order, when it is one of the two.
  bool chunked() const { return split_halves || avx2_halves; }
  gwq_gemv_avx2::Chunks chunks(int64_t columns) const {
    return split_halves ? gwq_gemv_avx2::Chunks::avx512_order() : gwq_gemv_avx2::Chunks::avx2_order(columns);
  }
};

const NibbleMap& nibble_map(int64_t columns) {
  static std::mutex mutex;
  static std::unordered_map<int64_t, NibbleMap> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(columns);
  if (found != cache.end()) return found->second;
  const int64_t count = kBlockN * columns;
  at::Tensor index = at::arange(count, at::kLong);
  at::Tensor source = at::zeros({count}, at::kLong);
  const int64_t digits = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::log2(static_cast<double>(count)) / 4)));
  for (int64_t d = 0; d < digits; ++d) {
    at::Tensor digit = at::bitwise_and(at::bitwise_right_shift(index, 4 * d), 15).to(at::kInt).view({kBlockN, columns});
    at::Tensor packed = at::_convert_weight_to_int4pack_for_cpu(digit, 8).view({-1}).to(at::kLong);
    at::Tensor nibbles = at::stack({at::bitwise_and(packed, 15), at::bitwise_right_shift(packed, 4)}, -1).view({-1});
    source = at::bitwise_or(source, at::bitwise_left_shift(nibbles, 4 * d));
  }
  TORCH_CHECK(at::equal(std::get<0>(at::sort(source)), index), "gwq_cpu.linear: torch's int4 CPU packing is not a permutation of nibbles");
  at::Tensor position = at::empty_like(source);
  position.index_put_({source}, index);
  at::Tensor by_k = position.view({kBlockN, columns}).t().contiguous();  // [columns, kBlockN]
  const int64_t* pos = by_k.const_data_ptr<int64_t>();
  NibbleMap map{std::vector<int32_t>(count), std::vector<uint8_t>(count)};
  map.split_halves = map.avx2_halves = true;
  for (int64_t i = 0; i < count; ++i) {
    map.byte[i] = static_cast<int32_t>(pos[i] / 2);
    map.shift[i] = static_cast<uint8_t>((pos[i] % 2) * 4);
    const int64_t k = i / kBlockN, n = i % kBlockN;
    map.split_halves = map.split_halves && map.byte[i] == k * (kBlockN / 2) + n % (kBlockN / 2) && map.shift[i] == 4 * (n / (kBlockN / 2));
    map.avx2_halves = map.avx2_halves && map.byte[i] == (n / 32) * 16 * columns + k * 16 + n % 16 && map.shift[i] == 4 * ((n % 32) / 16);
  }
  return cache.emplace(columns, std::move(map)).first->second;
}

// out = x' @ W.T + outliers + bias for M >= tile_min_rows: up to kTileBlocks 64-row blocks of W
// at a time are dequantized into a tile [columns, <= 256] (k-major: the GEMM's B operand as
// is), then one at::mm per tile.
// * tile_t = BFloat16 where the CPU has AVX512-BF16 (its bf16 GEMM runs ~3.5x the fp32 one
//   here, benchmarks/cpu_kernels.py): x' is bf16 and the tile holds the weight rounded to bf16,
//   outliers included (bf16(bf16(codes' value) + outlier): the salient weights computed at
//   bf16's 8-bit precision, as in a bf16 model; adding them separately in fp32 cost more than
//   the GEMM at M = 512, the transposed stores).
// * tile_t = float elsewhere: x' is fp32 and the tile exact to fp32.
// Work items are (tile, slice of x's rows): the tiles are made equal in width, and when their
// number does not divide among the threads, x's rows are split into one slice per thread, so
// every thread gets the same work (a 576-row weight is three 192-row tiles, not 256 + 256 + 64
// left to two threads); a tile is then dequantized once per slice, a few % of the GEMM.
template <typename index_t, typename out_t, typename tile_t>
void tiled_linear(
    const at::Tensor& xk, const uint8_t* __restrict__ codes, const at::BFloat16* __restrict__ grid,
    int64_t padded_rows, int64_t tile_group, const int64_t* __restrict__ kernel_column, const int32_t* __restrict__ row_ptr,
    const index_t* __restrict__ col, const at::Half* __restrict__ val, const float* __restrict__ bias, out_t* __restrict__ out,
    int64_t n_cols) {
  constexpr bool kBf16 = std::is_same_v<tile_t, at::BFloat16>;
  const int64_t m_rows = xk.size(0), columns = xk.size(1);
  const NibbleMap& map = nibble_map(columns);
  const bool vector_dequant = kBf16 && map.split_halves;
  const bool vector_dequant_f32 = !kBf16 && map.chunked() && gwq_gemv_avx2::supported();
  const gwq_gemv_avx2::Chunks chunks = map.chunks(columns);
  const int64_t blocks = (n_cols + kBlockN - 1) / kBlockN;
  const int64_t tiles_wanted = (blocks + kTileBlocks - 1) / kTileBlocks;
  const int64_t tile_blocks = (blocks + tiles_wanted - 1) / tiles_wanted;
  const int64_t width = tile_blocks * kBlockN;  // output columns per tile (per at::mm)
  const int64_t tiles = (n_cols + width - 1) / width;
  const int64_t threads = at::get_num_threads();
  const int64_t slices = (tiles % threads == 0) ? 1 : std::min<int64_t>(threads, m_rows);
  at::parallel_for(0, tiles * slices, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({columns, width}, xk.options());
    tile_t* __restrict__ w = tile.data_ptr<tile_t>();
    alignas(64) float scale[kBlockN], offset[kBlockN];  // w = q * scale + offset, offset = zero - 8 scale
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / slices, slice = item % slices;
      const int64_t m0 = m_rows * slice / slices, m1 = m_rows * (slice + 1) / slices, m_len = m1 - m0;
      const int64_t n0 = t * width, rows = std::min(width, n_cols - n0);
      for (int64_t j = 0; j * kBlockN < rows; ++j) {  // dequantize each 64-row block into tile columns [64 j, 64 j + 64)
        const int64_t b = t * tile_blocks + j;
        const uint8_t* __restrict__ block = codes + b * kBlockN * columns / 2;
        for (int64_t k = 0; k < columns; ++k) {
          if (k % tile_group == 0) {
            const at::BFloat16* sz = grid + ((k / tile_group) * padded_rows + b * kBlockN) * 2;
            for (int64_t n = 0; n < kBlockN; ++n) {
              scale[n] = static_cast<float>(sz[2 * n]);
              offset[n] = static_cast<float>(sz[2 * n + 1]) - 8.f * scale[n];
            }
          }
          tile_t* __restrict__ wk = w + k * width + j * kBlockN;
          if (vector_dequant) {
            gwq_gemv::dequant_column_bf16(block + k * (kBlockN / 2), scale, offset, reinterpret_cast<uint16_t*>(wk));
          } else if (vector_dequant_f32) {
            if constexpr (!kBf16) gwq_gemv_avx2::dequant_column_f32(block, chunks, k, scale, offset, wk);
          } else if (map.split_halves) {
            const uint8_t* __restrict__ bytes = block + k * (kBlockN / 2);
            constexpr int64_t half = kBlockN / 2;
            for (int64_t n = 0; n < half; ++n) {
              wk[n] = static_cast<tile_t>(static_cast<float>(bytes[n] & 15) * scale[n] + offset[n]);
              wk[n + half] = static_cast<tile_t>(static_cast<float>(bytes[n] >> 4) * scale[n + half] + offset[n + half]);
            }
          } else {
            const int32_t* __restrict__ byte = map.byte.data() + k * kBlockN;
            const uint8_t* __restrict__ shift = map.shift.data() + k * kBlockN;
            for (int64_t n = 0; n < kBlockN; ++n) {
              const int q = (block[byte[n]] >> shift[n]) & 15;
              wk[n] = static_cast<tile_t>(static_cast<float>(q) * scale[n] + offset[n]);
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int32_t j = row_ptr[n0 + r]; j < row_ptr[n0 + r + 1]; ++j) {
          tile_t& t_w = w[kernel_column[col[j]] * width + r];
          t_w = static_cast<tile_t>(static_cast<float>(t_w) + static_cast<float>(val[j]));
        }
      }
      at::Tensor y = at::mm(xk.narrow(0, m0, m_len), tile.narrow(1, 0, rows));  // [m_len, rows], tile_t
      const tile_t* __restrict__ yp = y.const_data_ptr<tile_t>();
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t r = 0; r < rows; ++r) {
          out[m * n_cols + n0 + r] = static_cast<out_t>(static_cast<float>(yp[(m - m0) * rows + r]) + (bias ? bias[n0 + r] : 0.f));
        }
      }
    }
  });
}

// Calls fn with the outliers' column indices as stored: int16, or int32 for K > 32767.
template <typename Fn>
void with_column_index(const at::Tensor& col, Fn&& fn) {
  if (col.scalar_type() == at::kShort) {
    fn(col.const_data_ptr<int16_t>());
  } else {
    fn(col.const_data_ptr<int32_t>());
  }
}

template <typename index_t, typename out_t>
void add_outliers_and_store(
    const at::BFloat16* __restrict__ y, int64_t ldy, const float* __restrict__ xt, int64_t m_rows,
    const int32_t* __restrict__ row_ptr, const index_t* __restrict__ col, const at::Half* __restrict__ val,
    const float* __restrict__ bias, out_t* __restrict__ out, int64_t n_cols) {
  if (m_rows == 1) {
    // Decode: one sparse dot product per output column, fused with the store.
    at::parallel_for(0, n_cols, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float acc = static_cast<float>(y[n]) + (bias ? bias[n] : 0.f);
        for (int32_t j = row_ptr[n]; j < row_ptr[n + 1]; ++j) acc += static_cast<float>(val[j]) * xt[col[j]];
        out[n] = static_cast<out_t>(acc);
      }
    });
    return;
  }
  // Prefill: (1) the outliers' sum, transposed: acc[n, 0:M] += val * x[:, col] with xt = x.T,
  // contiguous over M so it vectorizes; (2) out = y + acc.T + bias, tile by tile (16 rows of
  // out against the contiguous M-runs of acc), so neither transposed access leaves L1.
  std::vector<float> buffer(n_cols * m_rows, 0.f);
  float* __restrict__ acc = buffer.data();
  at::parallel_for(0, n_cols, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* __restrict__ a = acc + n * m_rows;
      for (int32_t j = row_ptr[n]; j < row_ptr[n + 1]; ++j) {
        const float v = static_cast<float>(val[j]);
        const float* __restrict__ xc = xt + static_cast<int64_t>(col[j]) * m_rows;
        for (int64_t m = 0; m < m_rows; ++m) a[m] += v * xc[m];
      }
    }
  });
  constexpr int64_t kRows = 16;
  at::parallel_for(0, (m_rows + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t mb = begin; mb < end; ++mb) {
      const int64_t m0 = mb * kRows, m1 = std::min(m_rows, m0 + kRows);
      for (int64_t n = 0; n < n_cols; ++n) {
        const float b = bias ? bias[n] : 0.f;
        const float* __restrict__ a = acc + n * m_rows;
        for (int64_t m = m0; m < m1; ++m) out[m * n_cols + n] = static_cast<out_t>(static_cast<float>(y[m * ldy + n]) + a[m] + b);
      }
    }
  });
}

// y[r] += sum_{j in row r} val[j] * x[col[j]] for the rows r < rows of one 64-row block
// (row_ptr[0..rows]: the block's CSR offsets).  GWQ rows hold a few outliers each (0.5 % of
// 576 columns: ~3), so a loop per row mispredicts its exit on most rows.  Instead the block's
// products are formed 16 at a time (cpu_gemv_bf16.h), summed into one running fp64 sum, and
// each row takes the difference of two running sums: no data-dependent branch, and fp64 keeps
// every fp32 bit of a row's sum.  Measured side by side with the per-row loop
// (benchmarks/results/cpu_kernel_ab_avx512_bf16.md, 210 SmolLM2 layers at M = 1): 0.96x the time at 0.5 %
// outliers, 0.87x at 2 %, unchanged without outliers.
template <typename index_t>
void add_block_outliers(
    const int32_t* __restrict__ row_ptr, int64_t rows, const index_t* __restrict__ col, const at::Half* __restrict__ val,
    const float* __restrict__ x, float* __restrict__ y, std::vector<double>& scratch) {
  const int32_t j0 = row_ptr[0], count = row_ptr[rows] - j0;
  if (count == 0) return;
  scratch.resize(2 * (static_cast<size_t>(count) + 1));  // count + 1 running sums, then count fp32 products
  double* __restrict__ running = scratch.data();
  float* __restrict__ prod = reinterpret_cast<float*>(running + count + 1);
  gwq_gemv::outlier_products(reinterpret_cast<const uint16_t*>(val + j0), col + j0, x, count, prod);
  double total = 0.0;
  running[0] = 0.0;
  for (int32_t j = 0; j < count; ++j) running[j + 1] = (total += static_cast<double>(prod[j]));
  for (int64_t r = 0; r < rows; ++r) y[r] += static_cast<float>(running[row_ptr[r + 1] - j0] - running[row_ptr[r] - j0]);
}

// out = x' @ W.T + outliers + bias for a few rows of x (decode), by the AVX512-BF16 GEMV of
// cpu_gemv_bf16.h on torch's packing: per row of x, every 64-row block of W in parallel, then
// that block's outliers (fp32 x, add_block_outliers) and bias fused into the store.
template <typename index_t, typename out_t>
void gemv_linear(
    const at::Tensor& xk, const at::Tensor& x32, const uint8_t* __restrict__ codes, const uint16_t* __restrict__ grid,
    int64_t padded_rows, int64_t tile_group, const int32_t* __restrict__ row_ptr, const index_t* __restrict__ col,
    const at::Half* __restrict__ val, const float* __restrict__ bias, out_t* __restrict__ out, int64_t n_cols) {
  const int64_t m_rows = xk.size(0), columns = xk.size(1), in_features = x32.size(1);
  const int64_t blocks = (n_cols + gwq_gemv::kRows - 1) / gwq_gemv::kRows;
  std::vector<uint32_t> pairs(columns * 4);
  std::vector<float> group_sums(columns / tile_group);
  // Threads only from ~128 K multiply-adds per task: below that a second
  // thread's start and join cost more than it saves (SmolLM2's 192-row k/v stay on one).
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / (gwq_gemv::kRows * columns));
  for (int64_t m = 0; m < m_rows; ++m) {
    gwq_gemv::arrange_x(
        reinterpret_cast<const uint16_t*>(xk.const_data_ptr<at::BFloat16>()) + m * columns, columns, tile_group, pairs.data(),
        group_sums.data());
    const float* __restrict__ xm = x32.const_data_ptr<float>() + m * in_features;
    out_t* __restrict__ om = out + m * n_cols;
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) float y[gwq_gemv::kRows];
      std::vector<double> scratch;  // add_block_outliers' buffers, reused by this task's blocks
      for (int64_t b = begin; b < end; ++b) {
        gwq_gemv::block_dot(
            codes + b * gwq_gemv::kRows * columns / 2, grid + b * gwq_gemv::kRows * 2, padded_rows * 2, pairs.data(), group_sums.data(),
            columns, tile_group, y);
        const int64_t n0 = b * gwq_gemv::kRows, rows = std::min<int64_t>(gwq_gemv::kRows, n_cols - n0);
        add_block_outliers(row_ptr + n0, rows, col, val, xm, y, scratch);
        for (int64_t r = 0; r < rows; ++r) om[n0 + r] = static_cast<out_t>(y[r] + (bias ? bias[n0 + r] : 0.f));
      }
    });
  }
}

// out = x' @ W.T + outliers + bias for a few rows of x on CPUs without AVX512-BF16, by the
// integer GEMV of cpu_gemv_avx2.h (x' fp32 here, rounded to int16 per tile group inside): every
// 64-row block of W in parallel, each block multiplied by all rows of x while it is in cache,
// then its outliers (fp32 x) and bias fused into the store.
template <typename index_t, typename out_t>
void gemv_linear_avx2(
    const at::Tensor& xk, const at::Tensor& x32, const uint8_t* __restrict__ codes, const uint16_t* __restrict__ grid,
    int64_t padded_rows, int64_t tile_group, const gwq_gemv_avx2::Chunks& chunks, const int32_t* __restrict__ row_ptr,
    const index_t* __restrict__ col, const at::Half* __restrict__ val, const float* __restrict__ bias, out_t* __restrict__ out, int64_t n_cols) {
  const int64_t m_rows = xk.size(0), columns = xk.size(1), in_features = x32.size(1);
  const int64_t blocks = (n_cols + gwq_gemv_avx2::kRows - 1) / gwq_gemv_avx2::kRows, groups = columns / tile_group;
  const float* __restrict__ xp = xk.const_data_ptr<float>();
  std::vector<int16_t> xq(m_rows * columns);
  std::vector<float> step(m_rows * groups);
  std::vector<int32_t> qsum(m_rows * groups);
  for (int64_t m = 0; m < m_rows; ++m) {
    gwq_gemv_avx2::quantize_x(xp + m * columns, columns, tile_group, xq.data() + m * columns, step.data() + m * groups, qsum.data() + m * groups);
  }
  const bool pair_contiguous = chunks.col_stride == 16;  // AVX2 order: columns k, k + 1 of a chunk are one 32-byte load
  // As in gemv_linear: threads only from ~128 K multiply-adds per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / (gwq_gemv_avx2::kRows * columns * m_rows));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(32) float y[gwq_gemv_avx2::kRows];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * gwq_gemv_avx2::kRows, rows = std::min<int64_t>(gwq_gemv_avx2::kRows, n_cols - n0);
      for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t* block = codes + b * gwq_gemv_avx2::kRows * columns / 2;
        const uint16_t* block_grid = grid + b * gwq_gemv_avx2::kRows * 2;
        const int16_t* xm_q = xq.data() + m * columns;
        const float* st = step.data() + m * groups;
        const int32_t* qs = qsum.data() + m * groups;
        if (pair_contiguous) {
          gwq_gemv_avx2::block_dot_i16<true>(block, chunks, block_grid, padded_rows * 2, xm_q, st, qs, columns, tile_group, y);
        } else {
          gwq_gemv_avx2::block_dot_i16<false>(block, chunks, block_grid, padded_rows * 2, xm_q, st, qs, columns, tile_group, y);
        }
        const float* __restrict__ xm = x32.const_data_ptr<float>() + m * in_features;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          float acc = y[r] + (bias ? bias[n] : 0.f);
          for (int32_t j = row_ptr[n]; j < row_ptr[n + 1]; ++j) acc += static_cast<float>(val[j]) * xm[col[j]];
          out[m * n_cols + n] = static_cast<out_t>(acc);
        }
      }
    }
  });
}

// x2 as contiguous fp32 rows for the AVX2 GEMV.  A bf16/fp16 decode row is converted here in
// one loop: through x2.to(kFloat) a 64x64 call took 9.5 us with bf16 x against 6.9 with fp32
// x, as much as a small GEMV's arithmetic (210 calls a SmolLM2 token).
at::Tensor float_rows(const at::Tensor& x2) {
  if (x2.scalar_type() == at::kFloat || !x2.is_contiguous() || (x2.scalar_type() != at::kBFloat16 && x2.scalar_type() != at::kHalf)) {
    return x2.to(at::kFloat).contiguous();
  }
  at::Tensor out = at::empty(x2.sizes(), x2.options().dtype(at::kFloat));
  float* __restrict__ o = out.data_ptr<float>();
  const int64_t count = x2.numel();
  if (x2.scalar_type() == at::kBFloat16) {
    const at::BFloat16* __restrict__ in = x2.const_data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < count; ++i) o[i] = static_cast<float>(in[i]);
  } else {
    const at::Half* __restrict__ in = x2.const_data_ptr<at::Half>();
    for (int64_t i = 0; i < count; ++i) o[i] = static_cast<float>(in[i]);
  }
  return out;
}

at::Tensor linear(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_zeros, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& values, const std::optional<at::Tensor>& bias,
    int64_t tile_group, int64_t in_features, int64_t pad, const std::optional<at::Tensor>& gather, bool repeat_k,
    int64_t tile_min_rows, int64_t gemv_max_rows) {
  TORCH_CHECK(x.size(-1) == in_features, "gwq_cpu.linear: x has ", x.size(-1), " features, the weight ", in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && values.scalar_type() == at::kHalf, "gwq_cpu.linear: CSR must be int32 row_ptr, fp16 values");
  TORCH_CHECK(codes.is_contiguous() && scales_zeros.is_contiguous() && codes.scalar_type() == at::kByte, "gwq_cpu.linear: codes must be contiguous uint8, scales_zeros contiguous");
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, "gwq_cpu.linear: col_idx must be int16 or int32");
  const int64_t n_cols = row_ptr.numel() - 1;
  at::Tensor x2 = x.reshape({-1, in_features});
  const int64_t m_rows = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_cols;
  at::Tensor out = at::empty(out_shape, x.options());
  if (m_rows == 0 || n_cols == 0) return out;

  at::Tensor row_ptr_c = row_ptr.contiguous(), col_c = col_idx.contiguous(), val_c = values.contiguous();
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const bool tiled = m_rows >= tile_min_rows;
  const bool bf16_tiles = tiled && gwq_gemv::supported();
  const bool gemv_bf16 = !tiled && m_rows <= gemv_max_rows && gwq_gemv::supported() && tile_group % 4 == 0;
  const int64_t columns = codes.size(1) * 2;
  const bool gemv_f32 = !tiled && m_rows <= gemv_max_rows && !gwq_gemv::supported() && gwq_gemv_avx2::supported() &&
      nibble_map(columns).chunked();
  // x' (module comment): bf16 for torch's int4 GEMM, the bf16 GEMV and bf16 tiles; fp32 for the
  // AVX2 GEMV (which rounds it to int16 per tile group itself) and fp32 tiles.
  const at::ScalarType x_dtype = (tiled && !bf16_tiles) || gemv_f32 ? at::kFloat : at::kBFloat16;
  at::Tensor xk = gemv_f32 ? float_rows(x2) : x2.to(x_dtype);
  if (gather.has_value()) {
    xk = at::constant_pad_nd(xk, {0, 1}).index_select(1, *gather);  // padded kernel columns read the appended zero
  } else if (pad > 0) {
    xk = at::constant_pad_nd(xk, {0, pad});
  }
  if (repeat_k) xk = at::cat({xk, xk}, 1);
  xk = xk.contiguous();

  if (tiled) {
    path_calls[kTile].fetch_add(1, std::memory_order_relaxed);
    // Kernel column of each input feature (where its outliers go in the tile): the gather's inverse.
    std::vector<int64_t> kernel_column(in_features);
    for (int64_t c = 0; c < in_features; ++c) kernel_column[c] = c;
    if (gather.has_value()) {
      at::Tensor g = gather->to(at::kLong).contiguous();
      const int64_t* gp = g.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < g.numel(); ++i) {
        if (gp[i] < in_features) kernel_column[gp[i]] = i;
      }
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gwq_cpu_linear_tiled", [&] {
      auto run = [&](auto* col) {
        auto go = [&](auto tile_type) {
          tiled_linear<std::remove_pointer_t<decltype(col)>, scalar_t, decltype(tile_type)>(
              xk, codes.const_data_ptr<uint8_t>(), scales_zeros.const_data_ptr<at::BFloat16>(), codes.size(0), tile_group,
              kernel_column.data(), row_ptr_c.const_data_ptr<int32_t>(), col, val_c.const_data_ptr<at::Half>(),
              b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), n_cols);
        };
        if (bf16_tiles) {
          go(at::BFloat16());
        } else {
          go(0.f);
        }
      };
      with_column_index(col_c, run);
    });
    return out;
  }

  if (gemv_f32) {
    path_calls[kGemv].fetch_add(1, std::memory_order_relaxed);
    // The outliers read x by input feature: x' itself unless it was padded, gathered or repeated.
    at::Tensor x32 = (pad == 0 && !gather.has_value() && !repeat_k) ? xk : x2.to(at::kFloat).contiguous();
    const gwq_gemv_avx2::Chunks chunks = nibble_map(columns).chunks(columns);  // cached: looked up under a lock, no rebuild
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gwq_cpu_linear_gemv_avx2", [&] {
      auto run = [&](auto* col) {
        gemv_linear_avx2(
            xk, x32, codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales_zeros.const_data_ptr<at::BFloat16>()),
            codes.size(0), tile_group, chunks, row_ptr_c.const_data_ptr<int32_t>(), col, val_c.const_data_ptr<at::Half>(),
            b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), n_cols);
      };
      with_column_index(col_c, run);
    });
    return out;
  }

  if (gemv_bf16) {
    path_calls[kGemv].fetch_add(1, std::memory_order_relaxed);
    at::Tensor x32 = x2.to(at::kFloat).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gwq_cpu_linear_gemv", [&] {
      auto run = [&](auto* col) {
        gemv_linear(
            xk, x32, codes.const_data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scales_zeros.const_data_ptr<at::BFloat16>()),
            codes.size(0), tile_group, row_ptr_c.const_data_ptr<int32_t>(), col, val_c.const_data_ptr<at::Half>(),
            b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), n_cols);
      };
      with_column_index(col_c, run);
    });
    return out;
  }

  path_calls[kInt4].fetch_add(1, std::memory_order_relaxed);
  at::Tensor y = at::_weight_int4pack_mm_for_cpu(xk, codes, tile_group, scales_zeros);
  at::Tensor xt = values.numel() ? x2.t().to(at::kFloat).contiguous() : at::empty({0}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gwq_cpu_linear", [&] {
    auto run = [&](auto* col) {
      add_outliers_and_store(
          y.const_data_ptr<at::BFloat16>(), y.size(1), xt.const_data_ptr<float>(), m_rows, row_ptr_c.const_data_ptr<int32_t>(),
          col, val_c.const_data_ptr<at::Half>(), b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), n_cols);
    };
    with_column_index(col_c, run);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gwq_cpu, m) {
  m.def(
      "linear(Tensor x, Tensor codes, Tensor scales_zeros, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int tile_group, int in_features, int pad, Tensor? gather, bool repeat_k, int tile_min_rows, int gemv_max_rows) -> Tensor");
  m.def("gemv_supported() -> bool");
  m.def("gemv_isa() -> str");
  m.def("path_calls() -> int[]");
}

TORCH_LIBRARY_IMPL(gwq_cpu, CPU, m) { m.impl("linear", &linear); }

// Whether this CPU runs a decode GEMV (else decode uses torch's int4 GEMM), and which one:
// AVX512-BF16 (cpu_gemv_bf16.h) or AVX2 + FMA (cpu_gemv_avx2.h).
TORCH_LIBRARY_IMPL(gwq_cpu, CompositeExplicitAutograd, m) {
  m.impl("gemv_supported", [] { return gwq_gemv::supported() || gwq_gemv_avx2::supported(); });
  m.impl("gemv_isa", [] { return std::string(gwq_gemv::supported() ? "avx512_bf16" : gwq_gemv_avx2::supported() ? "avx2" : ""); });
  m.impl("path_calls", [] {
    return std::vector<int64_t>{path_calls[kGemv].load(), path_calls[kInt4].load(), path_calls[kTile].load()};
  });
}

// The same kernel as a plain Python function, for eager inference: a call through the
// dispatcher parses its 14 arguments against the schema (~6 us from Python, as long as the
// whole 576x576 decode GEMV); pybind11 takes ~3.  Compiled graphs and autograd keep the op.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("linear", &linear, "torch.ops.gwq_cpu.linear without the dispatcher"); }
