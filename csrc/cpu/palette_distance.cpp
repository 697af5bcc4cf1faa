// CPU kernels of colorquant::palette_distance and its backward. The
// arithmetic is in common/palette_math.h (squared_distance,
// distance_grad_term; shared with the CUDA kernels); this file adds the loop
// structure of cpu/tiling.h: (image, chunk) tasks in parallel; inside a
// chunk, sub-tiles of kSubTile pixels, colours outermost (one sequential
// stretch of a [K, P] row at a time), the pixel loop innermost, so that it
// vectorizes.
//
//   forward:  per sub-tile, the pixels' channels widened once, then one row
//             segment of distances per colour.
//   backward: one pass over grad: per colour, each pixel's term is added to
//             its grad_image sums (colours in ascending order, in a buffer of
//             the sub-tile) and to the colour's per-lane grad_palette sums (in
//             registers, pixel i of the chunk in lane i % kLanes). Each chunk's
//             lanes are then added in lane order and scaled by -2, the chunks
//             of an image in chunk order, so grad_palette does not depend on
//             the number of threads.
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "common/checks.h"
#include "common/palette_math.h"
#include "cpu/allocation.h"
#include "cpu/tiling.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

// Pixels per sub-tile of a chunk (a multiple of kLanes): the tiles walk the
// [K, P] rows colour by colour, one sequential stretch of a row at a time
// (K rows read block by block, 4 KiB apart at P = 1024, would be more streams
// than the hardware prefetchers follow), with the sub-tile's pixels and sums
// in an L1-sized buffer.
constexpr int64_t kSubTile = 1024;
static_assert(kSubTile % kLanes == 0 && kChunkPixels % kSubTile == 0, "whole blocks per sub-tile");

// x[c*n + i] = image[c*ld + i] in opmath, for the n <= kSubTile pixels of a sub-tile.
template <typename scalar_t, typename opmath_t>
CQ_ALWAYS_INLINE void widen_pixels(const scalar_t* image, int64_t ld, int64_t C, int64_t n,
                                   opmath_t* x) {
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[c * n + i] = widen<opmath_t>(image[c * ld + i]);
  }
}

// out[k*out_ld + i] = squared_distance(image[:, i], palette[k]) for the n
// pixels of a chunk (image strided by ld over c), a sub-tile at a time, colours
// outermost. scratch: C * kSubTile values. kC: see dispatch_channels.
template <int kC, typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void distance_tile(const scalar_t* image, int64_t ld, const opmath_t* palette,
                                  int64_t K, int64_t C, int64_t n, scalar_t* out, int64_t out_ld,
                                  opmath_t* scratch) {
  const int64_t nc = kC > 0 ? kC : C;
  for (int64_t q = 0; q < n; q += kSubTile) {
    const int64_t m = std::min(kSubTile, n - q);
    opmath_t* x = scratch;  // [nc][m]
    widen_pixels(image + q, ld, nc, m, x);
    for (int64_t k = 0; k < K; ++k) {
      const opmath_t* colour = palette + k * nc;
      scalar_t* out_k = out + k * out_ld + q;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        out_k[i] = round_to<scalar_t>(squared_distance<kC, opmath_t>(x + i, m, colour, nc));
      }
    }
  }
}

// Backward over the n pixels of a chunk (grad strided by ld over k, image and
// grad_image over c), a sub-tile at a time, colours outermost:
//   grad_image[c, i] = distance_image_grad(sum_k distance_grad_term(grad[k,i], x[c,i], palette[k,c]))
//     (colours added in ascending order, from 0)
//   lanes[(k*C + c)*kLanes + i % kLanes] += distance_grad_term(...)
//     (each lane in pixel order across the chunk's sub-tiles)
// scratch: 2 * C * kSubTile values (+ C * kLanes for kC == 0). kC: see dispatch_channels.
template <int kC, typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void distance_backward_tile(const scalar_t* grad, const scalar_t* image, int64_t ld,
                                           const opmath_t* palette, int64_t K, int64_t C, int64_t n,
                                           scalar_t* grad_image, opmath_t* lanes,
                                           opmath_t* scratch) {
  const int64_t nc = kC > 0 ? kC : C;
  for (int64_t q = 0; q < n; q += kSubTile) {
    const int64_t m = std::min(kSubTile, n - q);
    opmath_t* x = scratch;        // [nc][m]
    opmath_t* gi = x + nc * m;    // [nc][m]: the sums over colours so far
    widen_pixels(image + q, ld, nc, m, x);
    for (int64_t j = 0; j < nc * m; ++j) gi[j] = opmath_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* g_k = grad + k * ld + q;
      // kC > 0: a copy of the colour, as gi could alias the palette for all gcc knows.
      opmath_t col[kC > 0 ? kC : 1];
      const opmath_t* colour = palette + k * nc;
      if constexpr (kC > 0) {
        for (int c = 0; c < kC; ++c) col[c] = colour[c];
        colour = col;
      }
      opmath_t local[kC > 0 ? kC * kLanes : 1];
      opmath_t* acc = kC > 0 ? local : gi + nc * m;  // [nc][kLanes]: this colour's lane sums
      for (int64_t j = 0; j < nc * kLanes; ++j) acc[j] = lanes[k * nc * kLanes + j];
      for_each_block(m, [&](int64_t i0, auto w) CQ_LAMBDA_INLINE {
#pragma omp simd
        for (int l = 0; l < w; ++l) {
          const opmath_t g = widen<opmath_t>(g_k[i0 + l]);
          for (int64_t c = 0; c < nc; ++c) {
            const opmath_t t = distance_grad_term(g, x[c * m + i0 + l], colour[c]);
            gi[c * m + i0 + l] = add_rn(gi[c * m + i0 + l], t);
            acc[c * kLanes + l] = add_rn(acc[c * kLanes + l], t);
          }
        }
      });
      for (int64_t j = 0; j < nc * kLanes; ++j) lanes[k * nc * kLanes + j] = acc[j];
    }
    for (int64_t c = 0; c < nc; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        grad_image[c * ld + q + i] = round_to<scalar_t>(distance_image_grad(gi[c * m + i]));
      }
    }
  }
}

// The palette of every image in opmath, [B*K*C].
template <typename scalar_t, typename opmath_t>
std::vector<opmath_t> widen_palette(const Tensor& palette) {
  const scalar_t* src = palette.const_data_ptr<scalar_t>();
  std::vector<opmath_t> pal(palette.numel());
  for (size_t j = 0; j < pal.size(); ++j) pal[j] = static_cast<opmath_t>(src[j]);
  return pal;
}

template <int kC, typename scalar_t>
void distance_forward(const Tensor& image, const Tensor& palette, Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1), K = palette.size(1);
  const int64_t P = image.size(2) * image.size(3);
  const std::vector<opmath_t> pal = widen_palette<scalar_t, opmath_t>(palette);
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  parallel_for_chunk_ranges(B, P, K * C, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> scratch(C * kSubTile);
    const int64_t nc = num_chunks(P);
    for (int64_t task = begin; task < end; ++task) {
      const Chunk ch = chunk_of(task, nc, P);
      distance_tile<kC>(img + ch.b * C * P + ch.p0, P, pal.data() + ch.b * K * C, K, C,
                        ch.p1 - ch.p0, dst + ch.b * K * P + ch.p0, P, scratch.data());
    }
  });
}

template <int kC, typename scalar_t>
void distance_backward(const Tensor& grad, const Tensor& image, const Tensor& palette,
                       Tensor& grad_image, Tensor& grad_palette) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1), K = palette.size(1);
  const int64_t P = image.size(2) * image.size(3);
  const int64_t nc = num_chunks(P), KC = K * C;
  const std::vector<opmath_t> pal = widen_palette<scalar_t, opmath_t>(palette);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_image.mutable_data_ptr<scalar_t>();
  // Per chunk: its grad_palette partial [K*C], already scaled.
  std::vector<opmath_t> partial(B * nc * KC);
  parallel_for_chunk_ranges(B, P, KC, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> lanes(KC * kLanes);
    std::vector<opmath_t> scratch(2 * C * kSubTile + C * kLanes);
    for (int64_t task = begin; task < end; ++task) {
      const Chunk ch = chunk_of(task, nc, P);
      std::fill(lanes.begin(), lanes.end(), opmath_t(0));
      distance_backward_tile<kC>(g + ch.b * K * P + ch.p0, img + ch.b * C * P + ch.p0, P,
                                 pal.data() + ch.b * KC, K, C, ch.p1 - ch.p0,
                                 gi + ch.b * C * P + ch.p0, lanes.data(), scratch.data());
      opmath_t* out = partial.data() + task * KC;
      for (int64_t j = 0; j < KC; ++j) {
        opmath_t s = opmath_t(0);
        for (int l = 0; l < kLanes; ++l) s = add_rn(s, lanes[j * kLanes + l]);
        out[j] = distance_palette_grad(s);
      }
    }
  });
  // Chunks in order, from 0 (P == 0: zeros).
  scalar_t* gp = grad_palette.mutable_data_ptr<scalar_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < KC; ++j) {
      opmath_t s = opmath_t(0);
      for (int64_t t = 0; t < nc; ++t) s = add_rn(s, partial[(b * nc + t) * KC + j]);
      gp[b * KC + j] = static_cast<scalar_t>(s);
    }
  }
}

Tensor palette_distance_cpu(const Tensor& image_in, const Tensor& palette_in) {
  check_image_palette(image_in, palette_in);
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1), K = palette.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  Tensor out = empty_output({B, K, H, W}, image.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "palette_distance_cpu", [&] {
                                    dispatch_channels(C, [&](auto kC) {
                                      distance_forward<decltype(kC)::value, scalar_t>(
                                          image, palette, out);
                                    });
                                  });
  return out;
}

std::tuple<Tensor, Tensor> palette_distance_backward_cpu(const Tensor& grad_in,
                                                         const Tensor& image_in,
                                                         const Tensor& palette_in) {
  check_palette_distance_backward(grad_in, image_in, palette_in);
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.contiguous();
  // A gradient normally arrives in the forward's dtype (a no-op then).
  const Tensor grad = grad_in.to(image.scalar_type()).contiguous();
  Tensor grad_image = empty_output(image.sizes(), image.options());
  Tensor grad_palette = at::empty(palette.sizes(), palette.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "palette_distance_backward_cpu", [&] {
                                    dispatch_channels(image.size(1), [&](auto kC) {
                                      distance_backward<decltype(kC)::value, scalar_t>(
                                          grad, image, palette, grad_image, grad_palette);
                                    });
                                  });
  return {grad_image, grad_palette};
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) {
  m.impl("palette_distance", &palette_distance_cpu);
  m.impl("palette_distance_backward", &palette_distance_backward_cpu);
}

}  // namespace cpu
}  // namespace colorquant
