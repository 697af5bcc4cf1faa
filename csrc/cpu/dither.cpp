// CPU kernel of colorquant::floyd_steinberg_dither: error diffusion onto a
// fixed palette per image, pixels in raster order (the per-pixel step is
// floyd_steinberg_pixel in common/palette_math.h). Images run in parallel;
// within an image the scan is sequential, with two rows of partial values
// (pixel + errors received) in opmath: the current row and the next.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/palette_math.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
void dither_forward(const Tensor& image, const Tensor& palette, Tensor& index_map) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t K = palette.size(1), P = H * W;
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  const scalar_t* pal_in = palette.const_data_ptr<scalar_t>();
  int64_t* idx = index_map.mutable_data_ptr<int64_t>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pal(K * C), row_a(W * C), row_b(W * C), carry(C), value(C);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < K * C; ++i) pal[i] = static_cast<acc_t>(pal_in[b * K * C + i]);
      const scalar_t* x = img + b * C * P;
      acc_t* cur = row_a.data();
      acc_t* next = row_b.data();
      // Row 0 has received no error: its partial values are the pixels.
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c = 0; c < C; ++c) cur[w * C + c] = static_cast<acc_t>(x[c * P + w]);
      }
      for (int64_t y = 0; y < H; ++y) {
        const bool has_below = y + 1 < H;
        for (int64_t w = 0; w < W; ++w) {
          acc_t* below = has_below ? next + w * C : nullptr;
          idx[b * P + y * W + w] = floyd_steinberg_pixel<0, acc_t>(
              cur + w * C, carry.data(), w == 0, value.data(), pal.data(), K, C,
              has_below && w > 0 ? below - C : nullptr, below,
              has_below && w + 1 < W ? below + C : nullptr,
              has_below ? x + (y + 1) * W + w : nullptr, P);
        }
        std::swap(cur, next);
      }
    }
  });
}

Tensor floyd_steinberg_dither_cpu(const Tensor& image_in, const Tensor& palette_in) {
  check_image_palette(image_in, palette_in);
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.contiguous();
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3);
  Tensor index_map = at::empty({B, H, W}, image.options().dtype(at::kLong));
  if (B == 0 || H * W == 0) return index_map;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "floyd_steinberg_dither_cpu",
                                  [&] { dither_forward<scalar_t>(image, palette, index_map); });
  return index_map;
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) {
  m.impl("floyd_steinberg_dither", &floyd_steinberg_dither_cpu);
}

}  // namespace cpu
}  // namespace colorquant
