// CPU kernel of colorquant::floyd_steinberg_dither: error diffusion onto a
// fixed palette per image, pixels in raster order (the per-pixel step is
// floyd_steinberg_pixel in common/palette_math.h). Images run in parallel;
// within an image the scan is sequential, with two rows of partial values
// (pixel + errors received) in opmath: the current row and the next. The
// nearest-colour search of palettes of 16 colours or more is vectorized.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <limits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/palette_math.h"
#include "cpu/tiling.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

// nearest_colour, vectorized over the palette in three passes: every squared
// distance, their minimum (NaN ignored), and the first colour at that minimum
// -- nearest_colour's answer, whose strict < keeps the first of equal
// colours and never lets a NaN win; a NaN distance to colour 0 wins
// everything, as in nearest_colour. (Keeping a running minimum per lane
// instead makes GCC store it with masked stores, which stall the loads that
// follow.) palette_t is the palette by channel, [C][padded_colours(K)],
// padded with NaN colours (their NaN distances never count); distances is
// scratch [padded_colours(K)].
inline int64_t padded_colours(int64_t K) { return (K + 15) / 16 * 16; }

template <int kC, typename acc_t>
struct VectorSearch {
  const acc_t* palette_t;
  int64_t padded;
  acc_t* distances;

  CQ_ALWAYS_INLINE int64_t operator()(const acc_t* value, const acc_t*, int64_t, int64_t C) const {
    acc_t* d = distances;
#pragma omp simd
    for (int64_t k = 0; k < padded; ++k) {
      // (colour - value)^2 == (value - colour)^2 exactly: a - b == -(b - a) in IEEE arithmetic.
      d[k] = squared_distance<kC, acc_t>(palette_t + k, padded, value, C);
    }
    if (!(d[0] == d[0])) return 0;
    acc_t nearest = d[0];
#pragma omp simd reduction(min : nearest)
    for (int64_t k = 0; k < padded; ++k) nearest = d[k] < nearest ? d[k] : nearest;
    int32_t first = std::numeric_limits<int32_t>::max();
#pragma omp simd reduction(min : first)
    for (int64_t k = 0; k < padded; ++k) {
      const int32_t candidate = d[k] == nearest ? static_cast<int32_t>(k) : first;
      first = candidate < first ? candidate : first;
    }
    return first;  // d[0] is not NaN, so some d[k] == nearest
  }
};

// The palettes from which VectorSearch is used: below, the fixed cost of its
// three passes outweighs what it saves.
constexpr int64_t kVectorSearchMinColours = 16;

// Error diffusion of one image x [C, P] onto its palette pal [K, C] (opmath);
// rows: two scratch rows of W * C partial values; pal_t: scratch for
// VectorSearch, (C + 1) * padded_colours(K).
template <int kC, typename scalar_t, typename acc_t>
CQ_SIMD_CLONES void dither_image(const scalar_t* x, int64_t C, int64_t H, int64_t W,
                                 const acc_t* pal, int64_t K, acc_t* row_a, acc_t* row_b,
                                 acc_t* pal_t, int64_t* idx, const ValueRange<acc_t>& range) {
  const int64_t n = kC > 0 ? kC : C;
  const int64_t P = H * W;
  // On the stack where C is known: per-thread heap buffers, which the compiler must assume may
  // alias the rows, made the scan about 20 % slower. carry is read from column 1 on.
  acc_t carry[kC > 0 ? kC : 1] = {}, value[kC > 0 ? kC : 1] = {};
  std::vector<acc_t> scratch(kC > 0 ? 0 : 2 * C);  // carry and value, C unknown at compile time
  acc_t* carry_p = kC > 0 ? carry : scratch.data();
  acc_t* value_p = kC > 0 ? value : scratch.data() + C;
  const bool vector_search = K >= kVectorSearchMinColours;
  const int64_t padded = padded_colours(K);
  if (vector_search) {
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t k = 0; k < padded; ++k) {
        pal_t[c * padded + k] = k < K ? pal[k * n + c] : std::numeric_limits<acc_t>::quiet_NaN();
      }
    }
  }
  auto scan = [&](const auto& nearest) CQ_LAMBDA_INLINE {
    acc_t* cur = row_a;
    acc_t* next = row_b;
    // Row 0 has received no error: its partial values are the pixels.
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t c = 0; c < n; ++c) cur[w * n + c] = static_cast<acc_t>(x[c * P + w]);
    }
    for (int64_t y = 0; y < H; ++y) {
      const bool has_below = y + 1 < H;
      for (int64_t w = 0; w < W; ++w) {
        acc_t* below = has_below ? next + w * n : nullptr;
        idx[y * W + w] = floyd_steinberg_pixel<kC, acc_t>(
            cur + w * n, carry_p, w == 0, value_p, pal, K, n,
            has_below && w > 0 ? below - n : nullptr, below,
            has_below && w + 1 < W ? below + n : nullptr,
            has_below ? x + (y + 1) * W + w : nullptr, P, range, nearest);
      }
      std::swap(cur, next);
    }
  };
  if (vector_search) {
    scan(VectorSearch<kC, acc_t>{pal_t, padded, pal_t + n * padded});
  } else {
    scan(NearestColour<kC, acc_t>{});
  }
}

template <typename scalar_t>
void dither_forward(const Tensor& image, const Tensor& palette, Tensor& index_map,
                    std::optional<double> clamp_min, std::optional<double> clamp_max) {
  using acc_t = at::opmath_type<scalar_t>;
  const ValueRange<acc_t> range = value_range<acc_t>(clamp_min, clamp_max);
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t K = palette.size(1), P = H * W;
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  const scalar_t* pal_in = palette.const_data_ptr<scalar_t>();
  int64_t* idx = index_map.mutable_data_ptr<int64_t>();
  const int64_t padded = padded_colours(K);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> pal(K * C), pal_t(padded * (C + 1)), row_a(W * C), row_b(W * C);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < K * C; ++i) pal[i] = static_cast<acc_t>(pal_in[b * K * C + i]);
      dispatch_channels(C, [&](auto kC) {
        dither_image<decltype(kC)::value>(img + b * C * P, C, H, W, pal.data(), K, row_a.data(),
                                          row_b.data(), pal_t.data(), idx + b * P, range);
      });
    }
  });
}

Tensor floyd_steinberg_dither_cpu(const Tensor& image_in, const Tensor& palette_in,
                                  std::optional<double> clamp_min, std::optional<double> clamp_max) {
  check_image_palette(image_in, palette_in);
  check_clamp(clamp_min, clamp_max);
  check_finite_pixels(image_in);
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.contiguous();
  const int64_t B = image.size(0), H = image.size(2), W = image.size(3);
  Tensor index_map = at::empty({B, H, W}, image.options().dtype(at::kLong));
  if (B == 0 || H * W == 0) return index_map;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "floyd_steinberg_dither_cpu",
                                  [&] { dither_forward<scalar_t>(image, palette, index_map, clamp_min, clamp_max); });
  return index_map;
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) {
  m.impl("floyd_steinberg_dither", &floyd_steinberg_dither_cpu);
}

}  // namespace cpu
}  // namespace colorquant
