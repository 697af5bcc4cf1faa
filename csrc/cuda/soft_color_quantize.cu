// CUDA kernels of soft_color_quantize and its backward. The arithmetic is in
// common/color_math.h (shared with the CPU kernels); this file only adds the
// parallel structure:
//   forward:  softmax (thread per pixel) -> per-colour sums (two deterministic
//             stages, cuda_utils.cuh) -> palette -> recolour (thread per pixel).
//             The palette is summed from the opmath probabilities (for
//             float16/bfloat16 recomputed, SoftmaxWeights), quantized from the
//             stored probs, as on the CPU.
//   backward: per-colour sums of grad_quantized -> adjoint A -> one thread per
//             pixel for grad_logits and grad_image, all from the probs that the
//             forward returned and autograd saved (the CPU kernel's choice too).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/color_math.h"
#include "cuda/cuda_utils.cuh"

namespace colorquant {
namespace {

using namespace cuda_detail;

// probs[b,:,p] = softmax(temperature * logits[b,:,p]). Thread per pixel:
// consecutive threads read consecutive pixels of one colour plane
// (coalesced). exp is recomputed in the last pass rather than stored, so
// half/bf16 probs are rounded once, from the opmath value. stats [B][2][P]
// (null for float32/float64, whose probs are the opmath values): the pixel's
// max and 1 / denominator, from which the palette sums recompute the opmath
// probabilities (SoftmaxWeights, the same softmax_prob as here).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(const scalar_t* __restrict__ logits,
                   scalar_t* __restrict__ probs, acc_t* __restrict__ stats,
                   int64_t B, int64_t P, int64_t K, acc_t temperature) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t p = i - b * P;
    const int64_t offset = b * K * P + p;
    const scalar_t* z_px = logits + offset;
    scalar_t* probs_px = probs + offset;

    // z is rounded as a product (mul_rn, no FMA contraction), so the
    // largest term is exactly exp(0) = 1 and both passes agree bitwise.
    auto z_at = [&](int64_t k) {
      return mul_rn(temperature, static_cast<acc_t>(z_px[k * P]));
    };
    acc_t z_max = z_at(0);
    for (int64_t k = 1; k < K; ++k) {
      const acc_t z = z_at(k);
      if (z > z_max) z_max = z;
    }
    acc_t denom = acc_t(0);
    for (int64_t k = 0; k < K; ++k) denom += shifted_exp(z_at(k) - z_max);
    // Reciprocal then multiply, as the CPU kernel does (same rounding).
    const acc_t inv_denom = acc_t(1) / denom;
    for (int64_t k = 0; k < K; ++k) {
      probs_px[k * P] = static_cast<scalar_t>(softmax_prob(z_at(k), z_max, inv_denom));
    }
    if (stats != nullptr) {
      stats[2 * b * P + p] = z_max;
      stats[2 * b * P + P + p] = inv_denom;
    }
  }
}

// out[c,p] = sum_k probs[k,p] * table[k,c] for one pixel (strided by P):
// quantized from the palette (forward) and grad_image from the adjoint
// (backward). Channels in register chunks, colours in ascending order.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void mix_colours(const scalar_t* probs_px,
                                            int64_t P, int64_t K,
                                            const acc_t* table, int64_t C,
                                            scalar_t* out_px) {
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    acc_t acc[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) acc[j] = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t w = static_cast<acc_t>(probs_px[k * P]);
      const acc_t* row = table + k * C + c0;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (c0 + j < C) acc[j] += w * row[j];
      }
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (c0 + j < C) out_px[(c0 + j) * P] = static_cast<scalar_t>(acc[j]);
    }
  }
}

// quantized[b,c,p] = sum_k probs[b,k,p] * palette[b,k,c], thread per pixel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    recolour_kernel(const scalar_t* __restrict__ probs,
                    const acc_t* __restrict__ palette,
                    scalar_t* __restrict__ quantized, int64_t B, int64_t P,
                    int64_t K, int64_t C) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t p = i - b * P;
    mix_colours(probs + b * K * P + p, P, K, palette + b * K * C, C,
                quantized + b * C * P + p);
  }
}

// Thread per pixel:
//   G[k]       = grad_probs[k] + sum_c prob_grad_term(gq[c], pal[k,c], A[k,c], x[c])
//   dot        = sum_k probs[k] G[k]
//   grad_logits[k] = softmax_logit_grad(probs[k], G[k], dot, temperature)
//   grad_image[c]  = sum_k A[k,c] probs[k]
// G is needed twice (for dot, then per colour) and recomputed rather than
// stored: K is up to 256, too many registers, and a [B,K,P] opmath buffer
// would cost more traffic than the few flops it saves.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) soft_backward_kernel(
    const scalar_t* __restrict__ probs, const scalar_t* __restrict__ image,
    const scalar_t* __restrict__ grad_quantized,
    const scalar_t* __restrict__ grad_probs,
    const scalar_t* __restrict__ palette, const acc_t* __restrict__ adjoint,
    scalar_t* __restrict__ grad_logits, scalar_t* __restrict__ grad_image,
    int64_t B, int64_t P, int64_t K, int64_t C, acc_t temperature) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t p = i - b * P;
    const int64_t kp_offset = b * K * P + p;
    const int64_t cp_offset = b * C * P + p;
    const scalar_t* probs_px = probs + kp_offset;
    // grad_probs is null when absent (zeros).
    const scalar_t* grad_probs_px = grad_probs ? grad_probs + kp_offset : nullptr;
    const scalar_t* x_px = image + cp_offset;
    const scalar_t* gq_px = grad_quantized + cp_offset;
    const scalar_t* palette_b = palette + b * K * C;
    const acc_t* adjoint_b = adjoint + b * K * C;

    // The pixel's first channels (all of them for C <= kChunk, e.g. RGB)
    // are read once instead of once per colour.
    acc_t gq_reg[kChunk];
    acc_t x_reg[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      gq_reg[j] = acc_t(0);
      x_reg[j] = acc_t(0);
      if (j < C) {
        gq_reg[j] = static_cast<acc_t>(gq_px[j * P]);
        x_reg[j] = static_cast<acc_t>(x_px[j * P]);
      }
    }

    auto colour_grad = [&](int64_t k) -> acc_t {
      const scalar_t* pal_k = palette_b + k * C;
      const acc_t* adj_k = adjoint_b + k * C;
      // Accumulated onto grad_probs in channel order, as on the CPU.
      acc_t g = grad_probs_px ? static_cast<acc_t>(grad_probs_px[k * P]) : acc_t(0);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (j < C) {
          g += prob_grad_term(gq_reg[j], static_cast<acc_t>(pal_k[j]),
                              adj_k[j], x_reg[j]);
        }
      }
      for (int64_t c = kChunk; c < C; ++c) {
        g += prob_grad_term(static_cast<acc_t>(gq_px[c * P]),
                            static_cast<acc_t>(pal_k[c]), adj_k[c],
                            static_cast<acc_t>(x_px[c * P]));
      }
      return g;
    };

    acc_t dot = acc_t(0);
    for (int64_t k = 0; k < K; ++k) {
      dot += static_cast<acc_t>(probs_px[k * P]) * colour_grad(k);
    }
    scalar_t* grad_logits_px = grad_logits + kp_offset;
    for (int64_t k = 0; k < K; ++k) {
      grad_logits_px[k * P] = static_cast<scalar_t>(
          softmax_logit_grad(static_cast<acc_t>(probs_px[k * P]),
                             colour_grad(k), dot, temperature));
    }
    mix_colours(probs_px, P, K, adjoint_b, C, grad_image + cp_offset);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_color_quantize_cuda(
    const at::Tensor& logits_in, const at::Tensor& image_in,
    double temperature, double eps) {
  check_logits_image(logits_in, image_in);
  check_temperature_eps(temperature, eps);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  const int64_t K = logits.size(1);
  const int64_t P = H * W;

  at::Tensor quantized = at::empty({B, C, H, W}, image.options());
  at::Tensor palette = at::empty({B, K, C}, image.options());
  at::Tensor probs = at::empty({B, K, H, W}, logits.options());
  if (B == 0) return {quantized, palette, probs};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, image.scalar_type(), "soft_color_quantize_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // Unrounded palette for the recolour: quantized is not degraded by a
        // half/bf16 round trip of the palette.
        const at::Tensor palette_acc =
            at::empty({B, K, C}, image.options().dtype(scalar_type_of<acc_t>()));
        // float16/bfloat16: the palette is summed from the opmath
        // probabilities (recomputed from the logits and these per-pixel
        // statistics, 8 bytes a pixel), not from probs as rounded: a
        // probability that underflows in float16 must still weigh its colour,
        // as on the CPU. float32/float64 probs are the opmath values.
        constexpr bool kHalfType = !std::is_same_v<scalar_t, acc_t>;
        const at::Tensor stats =
            kHalfType && P > 0
                ? at::empty({B, 2, P}, image.options().dtype(scalar_type_of<acc_t>()))
                : at::Tensor();
        acc_t* stats_ptr = stats.defined() ? stats.mutable_data_ptr<acc_t>() : nullptr;
        if (P > 0) {
          softmax_kernel<scalar_t, acc_t>
              <<<grid_for(B * P), kThreads, 0, stream>>>(
                  logits.const_data_ptr<scalar_t>(),
                  probs.mutable_data_ptr<scalar_t>(), stats_ptr, B, P, K,
                  static_cast<acc_t>(temperature));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // With P == 0 this still writes weighted_mean(0, 0, eps), as the
        // formula (and the CPU kernel) gives.
        auto sums = [&](auto weights) {
          colour_sums<Finish::kWeightedMean, scalar_t>(
              weights, image.const_data_ptr<scalar_t>(), B, P, K, C,
              /*extra=*/nullptr, eps, palette.mutable_data_ptr<scalar_t>(),
              palette_acc.mutable_data_ptr<acc_t>(), image.options(), stream);
        };
        if constexpr (kHalfType) {
          sums(SoftmaxWeights<scalar_t, acc_t>{logits.const_data_ptr<scalar_t>(), stats_ptr,
                                               static_cast<acc_t>(temperature)});
        } else {
          sums(ProbWeights<scalar_t>{probs.const_data_ptr<scalar_t>()});
        }
        if (P > 0) {
          recolour_kernel<scalar_t, acc_t>
              <<<grid_for(B * P), kThreads, 0, stream>>>(
                  probs.const_data_ptr<scalar_t>(),
                  palette_acc.const_data_ptr<acc_t>(),
                  quantized.mutable_data_ptr<scalar_t>(), B, P, K, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {quantized, palette, probs};
}

std::tuple<at::Tensor, at::Tensor> soft_color_quantize_backward_cuda(
    const std::optional<at::Tensor>& grad_quantized_in,
    const std::optional<at::Tensor>& grad_palette_in,
    const std::optional<at::Tensor>& grad_probs_in, const at::Tensor& probs_in,
    const at::Tensor& image_in, const at::Tensor& palette_in,
    double temperature, double eps) {
  check_soft_backward(grad_quantized_in, grad_palette_in, grad_probs_in,
                      probs_in, image_in, palette_in, temperature, eps);
  const int64_t B = image_in.size(0), C = image_in.size(1);
  const int64_t H = image_in.size(2), W = image_in.size(3);
  const int64_t K = probs_in.size(1);
  const int64_t P = H * W;

  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::ScalarType dtype = image_in.scalar_type();
  // Gradients normally arrive in the dtype of their forward tensor; .to() is
  // a no-op then and keeps one kernel dtype otherwise. An absent grad_probs
  // stays absent (the kernel reads zeros); the small ones become zeros.
  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor image = image_in.contiguous();
  const at::Tensor palette = palette_in.to(dtype).contiguous();
  const at::Tensor grad_quantized = soft_upstream_grad(grad_quantized_in, image, dtype, true);
  const at::Tensor grad_palette = soft_upstream_grad(grad_palette_in, palette, dtype, true);
  const at::Tensor grad_probs = soft_upstream_grad(grad_probs_in, probs, dtype, false);

  at::Tensor grad_logits = at::empty({B, K, H, W}, probs.options());
  at::Tensor grad_image = at::empty({B, C, H, W}, image.options());
  // Both outputs are per pixel: nothing to compute without pixels.
  if (B == 0 || P == 0) return {grad_logits, grad_image};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "soft_color_quantize_backward_cuda",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // A[k,c] = weighted_mean(grad_palette + sum_p probs*grad_quantized,
        //                        sum_p probs, eps), kept in opmath only.
        const at::Tensor adjoint =
            at::empty({B, K, C}, image.options().dtype(scalar_type_of<acc_t>()));
        colour_sums<Finish::kWeightedMean, scalar_t>(
            ProbWeights<scalar_t>{probs.const_data_ptr<scalar_t>()},
            grad_quantized.const_data_ptr<scalar_t>(), B, P, K, C,
            grad_palette.const_data_ptr<scalar_t>(), eps,
            /*out=*/static_cast<scalar_t*>(nullptr),
            adjoint.mutable_data_ptr<acc_t>(), image.options(), stream);
        soft_backward_kernel<scalar_t, acc_t>
            <<<grid_for(B * P), kThreads, 0, stream>>>(
                probs.const_data_ptr<scalar_t>(),
                image.const_data_ptr<scalar_t>(),
                grad_quantized.const_data_ptr<scalar_t>(),
                grad_probs.defined() ? grad_probs.const_data_ptr<scalar_t>() : nullptr,
                palette.const_data_ptr<scalar_t>(),
                adjoint.const_data_ptr<acc_t>(),
                grad_logits.mutable_data_ptr<scalar_t>(),
                grad_image.mutable_data_ptr<scalar_t>(), B, P, K, C,
                static_cast<acc_t>(temperature));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_logits, grad_image};
}

}  // namespace colorquant

TORCH_LIBRARY_IMPL(colorquant, CUDA, m) {
  m.impl("soft_color_quantize", &colorquant::soft_color_quantize_cuda);
  m.impl("soft_color_quantize_backward",
         &colorquant::soft_color_quantize_backward_cuda);
}
