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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

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

at::Tensor linear(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_zeros, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& values, const std::optional<at::Tensor>& bias,
    int64_t tile_group, int64_t in_features, int64_t pad, const std::optional<at::Tensor>& gather, bool repeat_k) {
  TORCH_CHECK(x.size(-1) == in_features, "gwq_cpu.linear: x has ", x.size(-1), " features, the weight ", in_features);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && values.scalar_type() == at::kHalf, "gwq_cpu.linear: CSR must be int32 row_ptr, fp16 values");
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, "gwq_cpu.linear: col_idx must be int16 or int32");
  const int64_t n_cols = row_ptr.numel() - 1;
  at::Tensor x2 = x.reshape({-1, in_features});
  const int64_t m_rows = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_cols;
  at::Tensor out = at::empty(out_shape, x.options());
  if (m_rows == 0 || n_cols == 0) return out;

  at::Tensor xb = x2.to(at::kBFloat16);
  if (gather.has_value()) {
    xb = at::constant_pad_nd(xb, {0, 1}).index_select(1, *gather);  // padded kernel columns read the appended zero
  } else if (pad > 0) {
    xb = at::constant_pad_nd(xb, {0, pad});
  }
  if (repeat_k) xb = at::cat({xb, xb}, 1);
  at::Tensor y = at::_weight_int4pack_mm_for_cpu(xb.contiguous(), codes, tile_group, scales_zeros);

  at::Tensor xt = values.numel() ? x2.t().to(at::kFloat).contiguous() : at::empty({0}, x.options().dtype(at::kFloat));
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor row_ptr_c = row_ptr.contiguous(), col_c = col_idx.contiguous(), val_c = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gwq_cpu_linear", [&] {
    auto run = [&](auto* col) {
      add_outliers_and_store(
          y.const_data_ptr<at::BFloat16>(), y.size(1), xt.const_data_ptr<float>(), m_rows, row_ptr_c.const_data_ptr<int32_t>(),
          col, val_c.const_data_ptr<at::Half>(), b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), n_cols);
    };
    if (col_c.scalar_type() == at::kShort) {
      run(col_c.const_data_ptr<int16_t>());
    } else {
      run(col_c.const_data_ptr<int32_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(gwq_cpu, m) {
  m.def(
      "linear(Tensor x, Tensor codes, Tensor scales_zeros, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int tile_group, int in_features, int pad, Tensor? gather, bool repeat_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(gwq_cpu, CPU, m) { m.impl("linear", &linear); }
