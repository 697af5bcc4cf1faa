// CPU kernels of colorquant::soft_color_quantize and its backward.
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "common/checks.h"
#include "cpu/allocation.h"
#include "cpu/tiling.h"

namespace colorquant {
namespace cpu {
namespace {

using at::Tensor;

// Both kernels run per (image, chunk) task in two stages: per-chunk colour
// sums, then per pixel with the image's palette (forward) or adjoint
// (backward). When an image is a single chunk (P <= kChunkPixels, e.g. CIFAR)
// a task does both stages for its image, so that the second pass over the
// image's probs finds them in cache; otherwise the sums of all chunks are
// complete only after a first parallel pass. Either way each sum is formed in
// the same order, whatever the number of threads.

template <int kC, typename scalar_t>
void soft_forward(const Tensor& logits, const Tensor& image, double temperature,
                  double eps, Tensor& quantized, Tensor& palette,
                  Tensor& probs) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), K = logits.size(1), C = image.size(1);
  const int64_t P = logits.size(2) * logits.size(3);
  const int64_t nc = num_chunks(P), T = tile_pixels(K), J = C + 1;
  const opmath_t temp = static_cast<opmath_t>(temperature);
  const scalar_t* lg = logits.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  scalar_t* pr = probs.mutable_data_ptr<scalar_t>();
  scalar_t* qt = quantized.mutable_data_ptr<scalar_t>();
  scalar_t* pal_out = palette.mutable_data_ptr<scalar_t>();

  // Per chunk: S[k] = sum_p probs, N[k,c] = sum_p probs*image.
  std::vector<opmath_t> partial(B * nc * K * J, opmath_t(0));
  // The palette unrounded, for the recolouring: quantized is not degraded by
  // a half/bf16 round trip of the palette.
  std::vector<opmath_t> pal(B * K * C);
  auto finish_palette = [&](int64_t b) {
    weighted_means(partial.data() + b * nc * K * J, nc, K, C,
                   static_cast<const scalar_t*>(nullptr), static_cast<opmath_t>(eps),
                   pal.data() + b * K * C);
    for (int64_t j = b * K * C; j < (b + 1) * K * C; ++j) {
      pal_out[j] = static_cast<scalar_t>(pal[j]);
    }
  };
  // quantized[c,p] = sum_k probs[k,p] palette[k,c] over a chunk.
  auto recolour = [&](const Chunk& ch, opmath_t* acc) {
    for (int64_t q = ch.p0; q < ch.p1; q += T) {
      mix_tile<kC>(pr + ch.b * K * P + q, P, pal.data() + ch.b * K * C, K, C,
                   std::min(T, ch.p1 - q), qt + ch.b * C * P + q, P, acc);
    }
  };
  const bool one_chunk = nc == 1;

  // The probs of a tile in opmath, rows padded so that they are not 4 KiB
  // apart (loads and stores a multiple of 4 KiB apart stall on each other).
  const int64_t tile_ld = T + kLanes;
  parallel_for_chunk_ranges(B, P, K, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf(K * tile_ld + C * T);
    opmath_t* tile = buf.data();
    opmath_t* work = tile + K * tile_ld;
    for (int64_t task = begin; task < end; ++task) {
      const Chunk ch = chunk_of(task, nc, P);
      opmath_t* acc = partial.data() + task * K * J;
      for (int64_t q = ch.p0; q < ch.p1; q += T) {
        const int64_t n = std::min(T, ch.p1 - q);
        const Tile next = tile_after(task, q + n, end, nc, P, T);
        softmax_tile(lg + ch.b * K * P + q, P, K, n, temp, tile, tile_ld,
                     pr + ch.b * K * P + q, P, lg + next.b * K * P + next.q, next.n);
        accumulate_weighted_sums<kC>(tile, tile_ld, img + ch.b * C * P + q, P, K, C, n, acc);
      }
      if (one_chunk) {
        finish_palette(ch.b);
        recolour(ch, work);
      }
    }
  });
  if (one_chunk) return;

  // Several chunks per image (or none: P == 0 still gets its palette).
  for (int64_t b = 0; b < B; ++b) finish_palette(b);
  parallel_for_chunk_ranges(B, P, K * C, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(C * T);
    for (int64_t task = begin; task < end; ++task) recolour(chunk_of(task, nc, P), acc.data());
  });
}

template <int kC, typename scalar_t>
void soft_backward(const Tensor& grad_quantized, const Tensor& grad_palette,
                   const Tensor& grad_probs, const Tensor& probs,
                   const Tensor& image, const Tensor& palette,
                   double temperature, double eps, Tensor& grad_logits,
                   Tensor& grad_image) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = probs.size(0), K = probs.size(1), C = image.size(1);
  const int64_t P = probs.size(2) * probs.size(3);
  const int64_t nc = num_chunks(P), T = tile_pixels(K), J = C + 1;
  const opmath_t temp = static_cast<opmath_t>(temperature);
  const scalar_t* gq = grad_quantized.const_data_ptr<scalar_t>();
  const scalar_t* gpal = grad_palette.const_data_ptr<scalar_t>();
  // grad_probs may be absent (zeros): then every colour reads one zero row.
  const scalar_t* gp = grad_probs.defined() ? grad_probs.const_data_ptr<scalar_t>() : nullptr;
  const int64_t gp_ld = gp ? P : 0;
  const std::vector<scalar_t> zero_row(gp ? 0 : T, scalar_t(0));
  const scalar_t* pr = probs.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  const scalar_t* pal_in = palette.const_data_ptr<scalar_t>();
  scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
  scalar_t* gi = grad_image.mutable_data_ptr<scalar_t>();

  // Per chunk: S[k] = sum_p probs, M[k,c] = sum_p probs*grad_quantized.
  std::vector<opmath_t> partial(B * nc * K * J, opmath_t(0));
  // Adjoint of the palette A[k,c] = (grad_palette + M) / (S + eps), and the
  // palette in opmath.
  std::vector<opmath_t> adj(B * K * C), pal(B * K * C);
  auto finish_adjoint = [&](int64_t b) {
    weighted_means(partial.data() + b * nc * K * J, nc, K, C, gpal + b * K * C,
                   static_cast<opmath_t>(eps), adj.data() + b * K * C);
    for (int64_t j = b * K * C; j < (b + 1) * K * C; ++j) {
      pal[j] = static_cast<opmath_t>(pal_in[j]);
    }
  };
  // Per pixel of a chunk: grad_logits (through G[k] = dL/dprobs[k] in total
  // and the softmax backward) and grad_image[c] = sum_k A[k,c] probs[k].
  auto pixel_grads = [&](int64_t task, int64_t task_end, opmath_t* work) {
    const Chunk ch = chunk_of(task, nc, P);
    const opmath_t* pal_b = pal.data() + ch.b * K * C;
    const opmath_t* adj_b = adj.data() + ch.b * K * C;
    for (int64_t q = ch.p0; q < ch.p1; q += T) {
      const int64_t n = std::min(T, ch.p1 - q);
      const int64_t kp = ch.b * K * P + q, cp = ch.b * C * P + q;
      const Tile next = tile_after(task, q + n, task_end, nc, P, T);
      const int64_t next_kp = next.b * K * P + next.q;
      soft_backward_tile<kC>(pr + kp, gp ? gp + kp : zero_row.data(), gp_ld, gq + cp, img + cp,
                             P, pal_b, adj_b, K, C, n, temp, gl + kp, gi + cp, work,
                             pr + next_kp, gp ? gp + next_kp : nullptr, next.n);
    }
  };
  // Scratch of soft_backward_tile.
  const int64_t scratch = kC > 0 ? K * kLanes : (K + 1) * T;
  const bool one_chunk = nc == 1;

  parallel_for_chunk_ranges(B, P, K * C, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf(one_chunk ? scratch : 0);
    for (int64_t task = begin; task < end; ++task) {
      const Chunk ch = chunk_of(task, nc, P);
      accumulate_weighted_sums<kC>(pr + ch.b * K * P + ch.p0, P, gq + ch.b * C * P + ch.p0, P,
                                   K, C, ch.p1 - ch.p0, partial.data() + task * K * J);
      if (one_chunk) {
        finish_adjoint(ch.b);
        pixel_grads(task, end, buf.data());
      }
    }
  });
  if (one_chunk) return;

  for (int64_t b = 0; b < B; ++b) finish_adjoint(b);
  parallel_for_chunk_ranges(B, P, K * C, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> buf(scratch);
    for (int64_t task = begin; task < end; ++task) {
      pixel_grads(task, end, buf.data());
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> soft_color_quantize_cpu(const Tensor& logits_in,
                                                           const Tensor& image_in,
                                                           double temperature, double eps) {
  check_logits_image(logits_in, image_in);
  check_temperature_eps(temperature, eps);
  const Tensor logits = logits_in.contiguous();
  const Tensor image = image_in.contiguous();
  const int64_t B = logits.size(0), K = logits.size(1), C = image.size(1);
  const int64_t H = logits.size(2), W = logits.size(3);
  Tensor quantized = empty_output({B, C, H, W}, image.options());
  Tensor palette = at::empty({B, K, C}, image.options());
  Tensor probs = empty_output({B, K, H, W}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_color_quantize_cpu", [&] {
        dispatch_channels(C, [&](auto kC) {
          soft_forward<decltype(kC)::value, scalar_t>(logits, image, temperature, eps, quantized, palette,
                                       probs);
        });
      });
  return {quantized, palette, probs};
}

std::tuple<Tensor, Tensor> soft_color_quantize_backward_cpu(
    const std::optional<Tensor>& grad_quantized, const std::optional<Tensor>& grad_palette,
    const std::optional<Tensor>& grad_probs, const Tensor& probs_in, const Tensor& image_in,
    const Tensor& palette_in, double temperature, double eps) {
  check_soft_backward(grad_quantized, grad_palette, grad_probs, probs_in, image_in, palette_in,
                      temperature, eps);
  const auto dtype = image_in.scalar_type();
  const Tensor probs = probs_in.contiguous();
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.to(dtype).contiguous();
  const Tensor gq = soft_upstream_grad(grad_quantized, image, dtype, true);
  const Tensor gpal = soft_upstream_grad(grad_palette, palette, dtype, true);
  const Tensor gp = soft_upstream_grad(grad_probs, probs, dtype, false);
  Tensor grad_logits = empty_output(probs.sizes(), probs.options());
  Tensor grad_image = empty_output(image.sizes(), image.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "soft_color_quantize_backward_cpu", [&] {
        dispatch_channels(image.size(1), [&](auto kC) {
          soft_backward<decltype(kC)::value, scalar_t>(gq, gpal, gp, probs, image, palette,
                                                      temperature, eps, grad_logits,
                                                      grad_image);
        });
      });
  return {grad_logits, grad_image};
}

}  // namespace

TORCH_LIBRARY_IMPL(colorquant, CPU, m) {
  m.impl("soft_color_quantize", &soft_color_quantize_cpu);
  m.impl("soft_color_quantize_backward", &soft_color_quantize_backward_cpu);
}

}  // namespace cpu
}  // namespace colorquant
