// CPU kernels of colorquant::soft_color_quantize and its backward.
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

template <typename scalar_t>
void soft_forward(const Tensor& logits, const Tensor& image, double temperature,
                  double eps, Tensor& quantized, Tensor& palette,
                  Tensor& probs) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), K = logits.size(1), C = image.size(1);
  const int64_t P = logits.size(2) * logits.size(3);
  const int64_t nc = num_chunks(P), T = tile_pixels(K);
  const opmath_t temp = static_cast<opmath_t>(temperature);
  const scalar_t* lg = logits.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  scalar_t* pr = probs.mutable_data_ptr<scalar_t>();
  scalar_t* qt = quantized.mutable_data_ptr<scalar_t>();

  // Stage 1: probs, and per-chunk sums S[k] = sum_p probs, N[k,c] = sum_p probs*image.
  std::vector<opmath_t> partial(B * nc * K * (C + 1), opmath_t(0));
  parallel_for_chunks(B, P, K, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
    std::vector<opmath_t> buf(K * T + 2 * T);
    opmath_t* acc = partial.data() + task * K * (C + 1);
    for (int64_t q = p0; q < p1; q += T) {
      const int64_t n = std::min(T, p1 - q);
      softmax_tile(lg + b * K * P + q, P, K, n, temp, buf.data(), T, buf.data() + K * T);
      for (int64_t k = 0; k < K; ++k) {
        scalar_t* out = pr + (b * K + k) * P + q;
        const opmath_t* pk = buf.data() + k * T;
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(pk[i]);
      }
      accumulate_weighted_sums(buf.data(), T, img + b * C * P + q, P, K, C, n, acc);
    }
  });

  // Stage 2: the palette, chunks added in order.
  std::vector<opmath_t> pal(B * K * C);
  finalize_weighted_means(partial.data(), B, nc, K, C, static_cast<const scalar_t*>(nullptr),
                          static_cast<opmath_t>(eps), pal.data());
  scalar_t* pal_out = palette.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < B * K * C; ++i) pal_out[i] = static_cast<scalar_t>(pal[i]);

  // Stage 3: quantized[c,p] = sum_k probs[k,p] palette[k,c].
  parallel_for_chunks(B, P, K * C, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
    std::vector<opmath_t> acc(T);
    for (int64_t q = p0; q < p1; q += T) {
      mix_tile(pr + b * K * P + q, P, pal.data() + b * K * C, K, C, std::min(T, p1 - q),
               qt + b * C * P + q, P, acc.data());
    }
  });
}

template <typename scalar_t>
void soft_backward(const Tensor& grad_quantized, const Tensor& grad_palette,
                   const Tensor& grad_probs, const Tensor& probs,
                   const Tensor& image, const Tensor& palette,
                   double temperature, double eps, Tensor& grad_logits,
                   Tensor& grad_image) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = probs.size(0), K = probs.size(1), C = image.size(1);
  const int64_t P = probs.size(2) * probs.size(3);
  const int64_t nc = num_chunks(P), T = tile_pixels(K);
  const opmath_t temp = static_cast<opmath_t>(temperature);
  const scalar_t* gq = grad_quantized.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad_probs.const_data_ptr<scalar_t>();
  const scalar_t* pr = probs.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  const scalar_t* pal_in = palette.const_data_ptr<scalar_t>();
  scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
  scalar_t* gi = grad_image.mutable_data_ptr<scalar_t>();

  // Stage 1: per-chunk S[k] = sum_p probs and M[k,c] = sum_p probs*grad_quantized.
  std::vector<opmath_t> partial(B * nc * K * (C + 1), opmath_t(0));
  parallel_for_chunks(B, P, K * C, [&](int64_t task, int64_t b, int64_t p0, int64_t p1) {
    accumulate_weighted_sums(pr + b * K * P + p0, P, gq + b * C * P + p0, P, K, C, p1 - p0,
                             partial.data() + task * K * (C + 1));
  });

  // Stage 2: adjoint of the palette, A[k,c] = (grad_palette + M) / (S + eps).
  std::vector<opmath_t> adj(B * K * C), pal(B * K * C);
  finalize_weighted_means(partial.data(), B, nc, K, C, grad_palette.const_data_ptr<scalar_t>(),
                          static_cast<opmath_t>(eps), adj.data());
  for (int64_t i = 0; i < B * K * C; ++i) pal[i] = static_cast<opmath_t>(pal_in[i]);

  // Stage 3, per pixel: G[k] = dL/dprobs[k] in total, then the softmax backward
  // and grad_image[c] = sum_k A[k,c] probs[k].
  parallel_for_chunks(B, P, K * C, [&](int64_t, int64_t b, int64_t p0, int64_t p1) {
    std::vector<opmath_t> G(K * T), dot(T);
    for (int64_t q = p0; q < p1; q += T) {
      const int64_t n = std::min(T, p1 - q);
      const int64_t kp = b * K * P + q, cp = b * C * P + q;
      soft_backward_tile(pr + kp, gp + kp, gq + cp, img + cp, P, pal.data() + b * K * C,
                         adj.data() + b * K * C, K, C, n, temp, gl + kp, G.data(), dot.data());
      mix_tile(pr + kp, P, adj.data() + b * K * C, K, C, n, gi + cp, P, dot.data());
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
  Tensor quantized = at::empty({B, C, H, W}, image.options());
  Tensor palette = at::empty({B, K, C}, image.options());
  Tensor probs = at::empty({B, K, H, W}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "soft_color_quantize_cpu", [&] {
                                    soft_forward<scalar_t>(logits, image, temperature, eps,
                                                           quantized, palette, probs);
                                  });
  return {quantized, palette, probs};
}

std::tuple<Tensor, Tensor> soft_color_quantize_backward_cpu(
    const Tensor& grad_quantized, const Tensor& grad_palette, const Tensor& grad_probs,
    const Tensor& probs_in, const Tensor& image_in, const Tensor& palette_in,
    double temperature, double eps) {
  check_soft_backward(grad_quantized, grad_palette, grad_probs, probs_in, image_in, palette_in,
                      temperature, eps);
  const auto dtype = image_in.scalar_type();
  const Tensor probs = probs_in.contiguous();
  const Tensor image = image_in.contiguous();
  const Tensor palette = palette_in.to(dtype).contiguous();
  const Tensor gq = grad_quantized.to(dtype).contiguous();
  const Tensor gpal = grad_palette.to(dtype).contiguous();
  const Tensor gp = grad_probs.to(dtype).contiguous();
  Tensor grad_logits = at::empty(probs.sizes(), probs.options());
  Tensor grad_image = at::empty(image.sizes(), image.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "soft_color_quantize_backward_cpu", [&] {
                                    soft_backward<scalar_t>(gq, gpal, gp, probs, image, palette,
                                                            temperature, eps, grad_logits,
                                                            grad_image);
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
