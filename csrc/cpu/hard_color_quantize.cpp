// CPU kernels of colorquant::hard_color_quantize, render_index_map and
// render_index_map_backward (they share the per-index sums and the gather).
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "common/checks.h"
#include "cpu/tiling.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

// out[b,c,p] = palette[b, index[b,p], c]; an index outside [0, K) raises IndexError.
template <typename scalar_t>
void render(const int64_t* index, const scalar_t* palette, int64_t B, int64_t K, int64_t C,
            int64_t P, scalar_t* out) {
  dispatch_channels(C, [&](auto kC) {
    parallel_for_chunks(B, P, C, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
      const int64_t* idx = index + b * P + p0;
      if (!gather_palette<decltype(kC)::value>(idx, palette + b * K * C, C, K, p1 - p0,
                                               out + b * C * P + p0, P)) {
        check_indices(idx, p1 - p0, K);
      }
    });
  });
}

// Per-chunk sums over the pixels of each index, then chunks added in order:
// sums[b,k,c] = sum_{index[b,p]==k} y[b,c,p], counts[b,k] = #{p : index[b,p]==k}.
// An index outside [0, K) raises IndexError.
template <typename scalar_t, typename opmath_t>
void index_sums(const int64_t* index, const scalar_t* y, int64_t B, int64_t K, int64_t C,
                int64_t P, std::vector<opmath_t>& sums, std::vector<int64_t>& counts) {
  const int64_t nc = num_chunks(P);
  std::vector<opmath_t> partial(B * nc * K * C, opmath_t(0));
  std::vector<int64_t> partial_counts(B * nc * K, 0);
  dispatch_channels(C, [&](auto kC) {
    parallel_for_chunks(B, P, C, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
      const int64_t* idx = index + b * P + p0;
      if (!accumulate_index_sums<decltype(kC)::value>(idx, y + b * C * P + p0, P, C, K, p1 - p0,
                                                      partial.data() + task * K * C,
                                                      partial_counts.data() + task * K)) {
        check_indices(idx, p1 - p0, K);
      }
    });
  });
  sums.assign(B * K * C, opmath_t(0));
  counts.assign(B * K, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < nc; ++t) {
      const int64_t task = b * nc + t;
      for (int64_t j = 0; j < K * C; ++j) sums[b * K * C + j] += partial[task * K * C + j];
      for (int64_t k = 0; k < K; ++k) counts[b * K + k] += partial_counts[task * K + k];
    }
  }
}

// out[i] = argmax_k logits[k*stride + i] (torch.argmax's order: the first
// maximum, NaN above all) for the n pixels of a tile, the pixel loop innermost
// with selects instead of branches, so that it vectorizes. next: the next
// tile's logits (n_next pixels, to prefetch).
template <typename scalar_t>
CQ_SIMD_CLONES void argmax_tile(const scalar_t* logits, int64_t stride, int64_t K, int64_t n,
                                int64_t* out, const scalar_t* next, int64_t n_next) {
  using opmath_t = at::opmath_type<scalar_t>;
  for_each_block(n, [&](int64_t i0, auto m) CQ_LAMBDA_INLINE {
    const int64_t fetch = std::min<int64_t>(m, n_next - i0);
    opmath_t best[kLanes];
    int32_t best_k[kLanes];  // 32-bit, as wide as the float lanes
#pragma omp simd
    for (int l = 0; l < m; ++l) {
      best[l] = widen<opmath_t>(logits[i0 + l]);
      best_k[l] = 0;
    }
    if (fetch > 0) prefetch_row(next + i0, fetch);
    for (int64_t k = 1; k < K; ++k) {
      const scalar_t* lk = logits + k * stride + i0;
      if (fetch > 0) prefetch_row(next + k * stride + i0, fetch);
#pragma omp simd
      for (int l = 0; l < m; ++l) {
        const opmath_t v = widen<opmath_t>(lk[l]);
        const bool take = argmax_prefers(v, best[l]);
        best[l] = take ? v : best[l];
        best_k[l] = take ? static_cast<int32_t>(k) : best_k[l];
      }
    }
    for (int l = 0; l < m; ++l) out[i0 + l] = best_k[l];
  });
}

template <typename scalar_t>
void hard_forward(const Tensor& logits, const Tensor& image, Tensor& quantized,
                  Tensor& index_map, Tensor& palette) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), K = logits.size(1), C = image.size(1);
  const int64_t P = logits.size(2) * logits.size(3);
  const int64_t T = tile_pixels(K);  // pixels per tile: their K rows of logits stay in L2
  const scalar_t* lg = logits.const_data_ptr<scalar_t>();
  int64_t* idx = index_map.mutable_data_ptr<int64_t>();

  parallel_for_chunks(B, P, K, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
    for (int64_t q = p0; q < p1; q += T) {
      const scalar_t* tile = lg + b * K * P + q;
      argmax_tile(tile, P, K, std::min(T, p1 - q), idx + b * P + q, tile + T,
                  std::max<int64_t>(0, std::min(T, p1 - q - T)));
    }
  });

  std::vector<opmath_t> sums;
  std::vector<int64_t> counts;
  index_sums(idx, image.const_data_ptr<scalar_t>(), B, K, C, P, sums, counts);
  scalar_t* pal = palette.mutable_data_ptr<scalar_t>();
  for (int64_t bk = 0; bk < B * K; ++bk) {
    for (int64_t c = 0; c < C; ++c) {
      pal[bk * C + c] = static_cast<scalar_t>(mean_or_zero(sums[bk * C + c], counts[bk]));
    }
  }
  // Gathered from the palette as stored, so quantized == render_index_map(index_map, palette).
  render(idx, pal, B, K, C, P, quantized.mutable_data_ptr<scalar_t>());
}

std::tuple<Tensor, Tensor, Tensor> hard_color_quantize_cpu(const Tensor& logits_in,
                                                           const Tensor& image_in) {
  check_logits_image(logits_in, image_in);
  const Tensor logits = logits_in.contiguous();
  const Tensor image = image_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1), C = image.size(1);
  const int64_t H = logits.size(2), W = logits.size(3);
  Tensor quantized = at::empty({B, C, H, W}, image.options());
  Tensor index_map = at::empty({B, H, W}, logits.options().dtype(at::kLong));
  Tensor palette = at::empty({B, K, C}, image.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "hard_color_quantize_cpu", [&] {
                                    hard_forward<scalar_t>(logits, image, quantized, index_map,
                                                           palette);
                                  });
  return {quantized, index_map, palette};
}

// check_indices is accepted for the schema's sake: on the CPU the range check
// is part of the pass over the indices and costs no sync, so it always runs.
Tensor render_index_map_cpu(const Tensor& index_in, const Tensor& palette_in,
                            bool /*check_indices*/) {
  check_index_palette(index_in, palette_in);
  const Tensor index_map = index_in.contiguous();
  const Tensor palette = palette_in.contiguous();
  const int64_t B = index_map.size(0), H = index_map.size(1), W = index_map.size(2);
  const int64_t K = palette.size(1), C = palette.size(2);
  Tensor out = at::empty({B, C, H, W}, palette.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, palette.scalar_type(),
                                  "render_index_map_cpu", [&] {
                                    render(index_map.const_data_ptr<int64_t>(),
                                           palette.const_data_ptr<scalar_t>(), B, K, C, H * W,
                                           out.mutable_data_ptr<scalar_t>());
                                  });
  return out;
}

Tensor render_index_map_backward_cpu(const Tensor& grad_in, const Tensor& index_in,
                                     const Tensor& palette, bool /*check_indices*/) {
  check_index_palette(index_in, palette);
  const int64_t B = index_in.size(0), H = index_in.size(1), W = index_in.size(2);
  const int64_t K = palette.size(1), C = palette.size(2);
  check_grad(grad_in, {B, C, H, W}, palette, "grad_image");
  const Tensor index_map = index_in.contiguous();
  const Tensor grad = grad_in.to(palette.scalar_type()).contiguous();
  Tensor grad_palette = at::empty({B, K, C}, palette.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, palette.scalar_type(),
                                  "render_index_map_backward_cpu", [&] {
                                    using opmath_t = at::opmath_type<scalar_t>;
                                    std::vector<opmath_t> sums;
                                    std::vector<int64_t> counts;
                                    index_sums(index_map.const_data_ptr<int64_t>(),
                                               grad.const_data_ptr<scalar_t>(), B, K, C, H * W,
                                               sums, counts);
                                    scalar_t* out = grad_palette.mutable_data_ptr<scalar_t>();
                                    for (int64_t i = 0; i < B * K * C; ++i) {
                                      out[i] = static_cast<scalar_t>(sums[i]);
                                    }
                                  });
  return grad_palette;
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) {
  m.impl("hard_color_quantize", &hard_color_quantize_cpu);
  m.impl("render_index_map", &render_index_map_cpu);
  m.impl("render_index_map_backward", &render_index_map_backward_cpu);
}

}  // namespace cpu
}  // namespace colorquant
