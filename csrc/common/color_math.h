// Per-pixel arithmetic of the colour-quantization ops, shared by the CPU and
// CUDA kernels. Every formula of the ops lives here exactly once, so the CPU
// tests cover the arithmetic that the CUDA kernels run as well; the kernels
// themselves only add loop structure (tiling, reductions, indexing).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CQ_HD __host__ __device__ __forceinline__
#else
#define CQ_HD inline
#endif

namespace colorquant {

// exp(x) for the shifted softmax argument x = z - max(z) <= 0.
// Host float: a branch-free Cephes-style polynomial (max. rel. error ~2e-7),
// written so that loops over pixels auto-vectorize (std::exp does not).
// Device and double: the library exp.
CQ_HD float shifted_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  // Clamp keeps 2^n a normal float; exp(-87) ~ 1.6e-38 is 0 for any softmax
  // whose largest term is 1.
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln 2) via the 1.5 * 2^23 trick (exact for |v| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = x - n ln 2 in two steps (Cody-Waite) to keep r accurate.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
#endif
}

CQ_HD double shifted_exp(double x) { return exp(x); }

// probs[k] of the shifted softmax, exp(z_k - max_j z_j) / sum_j exp(z_j - max_j z_j),
// from the pixel's max and the reciprocal of its denominator (taken once per
// pixel). The CUDA forward evaluates it twice per (colour, pixel) -- once to
// store probs, once in the accumulation type for the palette sums of
// float16/bfloat16 inputs -- and gets the same value both times.
template <typename T>
CQ_HD T softmax_prob(T z, T z_max, T inv_denom) {
  return shifted_exp(z - z_max) * inv_denom;
}

// Soft palette entry: a probability-weighted mean, eps keeps unused colours
// finite. Forward: (sum_p probs*image, sum_p probs). Backward: the adjoint
// A[k,c] = (grad_palette + sum_p probs*grad_quantized) / (sum_p probs + eps).
template <typename T>
CQ_HD T weighted_mean(T weighted_sum, T weight, T eps) {
  return weighted_sum / (weight + eps);
}

// Hard palette entry: the plain mean over the pixels of one colour; an unused
// colour gets zeros.
template <typename T>
CQ_HD T mean_or_zero(T sum, int64_t count) {
  return count > 0 ? sum / static_cast<T>(count) : T(0);
}

// argmax order of torch.argmax: the first maximum wins (strict >), and NaN
// counts as larger than any number.
template <typename T>
CQ_HD bool argmax_prefers(T candidate, T best) {
  return candidate > best || (candidate != candidate && best == best);
}

// One (colour k, channel c) term of dL/dprobs[k,p] through the palette:
//   quantized[c,p] = sum_k probs[k,p] palette[k,c]          -> g_q * palette
//   palette[k,c]   = sum_p probs x / (sum_p probs + eps)    -> A * (x - palette)
template <typename T>
CQ_HD T prob_grad_term(T grad_quantized_c, T palette_kc, T adjoint_kc,
                       T image_c) {
  return grad_quantized_c * palette_kc + adjoint_kc * (image_c - palette_kc);
}

// Softmax backward for probs = softmax(temperature * logits):
//   dL/dlogits[k] = temperature * probs[k] * (dL/dprobs[k] - sum_j probs[j] dL/dprobs[j]).
template <typename T>
CQ_HD T softmax_logit_grad(T prob, T grad_prob, T dot, T temperature) {
  return temperature * prob * (grad_prob - dot);
}

}  // namespace colorquant
