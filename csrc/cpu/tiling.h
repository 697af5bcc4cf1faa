// Loop structure shared by the CPU kernels: (image, chunk) tasks run in
// parallel; inside a task, pixels are processed in tiles with the pixel loop
// innermost so that it vectorizes. The arithmetic itself comes from
// common/color_math.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "common/color_math.h"

// The tile loops are compiled for AVX-512 and AVX2 as well as the baseline
// x86-64 ISA, the best one picked at load time (GCC function multiversioning),
// as ATen does for its own kernels. Results are deterministic on a machine;
// the vector width may change the last bits of a sum between machines.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CQ_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CQ_SIMD_CLONES
#endif

namespace colorquant {
namespace cpu {

// Partial sums are kept per chunk of this many pixels and added in chunk
// order, so results are bit-identical for any number of threads.
constexpr int64_t kChunkPixels = 8192;

// Pixels per tile: a [K x tile] buffer of float stays around 64 KiB (L2).
inline int64_t tile_pixels(int64_t num_colors) {
  return std::clamp<int64_t>(16384 / num_colors, 16, 1024);
}

inline int64_t num_chunks(int64_t num_pixels) {
  return (num_pixels + kChunkPixels - 1) / kChunkPixels;
}

// Below about this many (pixel x colour) operations a task list runs on the
// calling thread: waking the thread pool costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

// Runs f(task, b, p_begin, p_end) for every (image b, chunk) task in parallel;
// task = b * num_chunks + chunk indexes the per-task partial sums.
// work_per_pixel (e.g. K or K*C) only sets how many tasks a thread takes at
// least; results never depend on it.
template <typename F>
void parallel_for_chunks(int64_t batch, int64_t num_pixels, int64_t work_per_pixel,
                         const F& f) {
  const int64_t nc = num_chunks(num_pixels);
  const int64_t task_work =
      std::max<int64_t>(1, std::min(num_pixels, kChunkPixels) * work_per_pixel);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / task_work);
  at::parallel_for(0, batch * nc, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nc;
      const int64_t p0 = (task % nc) * kChunkPixels;
      f(task, b, p0, std::min(num_pixels, p0 + kChunkPixels));
    }
  });
}

// probs[k*ld + i] = softmax_k(temperature * logits[k*stride + i]) for the n
// pixels of a tile. work holds 2n values.
template <typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void softmax_tile(const scalar_t* logits, int64_t stride, int64_t num_colors,
                  int64_t n, opmath_t temperature, opmath_t* probs, int64_t ld,
                  opmath_t* work) {
  opmath_t* max_z = work;
  opmath_t* inv_sum = work + n;
  for (int64_t i = 0; i < n; ++i) {
    max_z[i] = temperature * static_cast<opmath_t>(logits[i]);
    inv_sum[i] = 0;
  }
  for (int64_t k = 1; k < num_colors; ++k) {
    const scalar_t* lk = logits + k * stride;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t z = temperature * static_cast<opmath_t>(lk[i]);
      max_z[i] = z > max_z[i] ? z : max_z[i];
    }
  }
  for (int64_t k = 0; k < num_colors; ++k) {
    const scalar_t* lk = logits + k * stride;
    opmath_t* pk = probs + k * ld;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t e =
          shifted_exp(temperature * static_cast<opmath_t>(lk[i]) - max_z[i]);
      pk[i] = e;
      inv_sum[i] += e;
    }
  }
  for (int64_t i = 0; i < n; ++i) inv_sum[i] = opmath_t(1) / inv_sum[i];
  for (int64_t k = 0; k < num_colors; ++k) {
    opmath_t* pk = probs + k * ld;
    for (int64_t i = 0; i < n; ++i) pk[i] *= inv_sum[i];
  }
}

// acc[k*(C+1)]     += sum_i w[k*w_ld + i]
// acc[k*(C+1)+1+c] += sum_i w[k*w_ld + i] * y[c*y_ld + i]
// Forward: w = probs, y = image. Backward: w = probs, y = grad_quantized.
template <typename w_t, typename y_t, typename opmath_t>
CQ_SIMD_CLONES void accumulate_weighted_sums(const w_t* w, int64_t w_ld, const y_t* y,
                              int64_t y_ld, int64_t num_colors,
                              int64_t channels, int64_t n, opmath_t* acc) {
  for (int64_t k = 0; k < num_colors; ++k) {
    const w_t* wk = w + k * w_ld;
    opmath_t* acc_k = acc + k * (channels + 1);
    opmath_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<opmath_t>(wk[i]);
    acc_k[0] += s;
    for (int64_t c = 0; c < channels; ++c) {
      const y_t* yc = y + c * y_ld;
      opmath_t t = 0;
#pragma omp simd reduction(+ : t)
      for (int64_t i = 0; i < n; ++i) {
        t += static_cast<opmath_t>(wk[i]) * static_cast<opmath_t>(yc[i]);
      }
      acc_k[1 + c] += t;
    }
  }
}

// out[c*out_ld + i] = sum_k w[k*w_ld + i] * table[k*C + c] for the n pixels of
// a tile: quantized from the palette (forward), grad_image from the adjoint
// (backward). acc holds n values.
template <typename w_t, typename opmath_t, typename out_t>
CQ_SIMD_CLONES void mix_tile(const w_t* w, int64_t w_ld, const opmath_t* table,
                             int64_t num_colors, int64_t channels, int64_t n,
                             out_t* out, int64_t out_ld, opmath_t* acc) {
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t i = 0; i < n; ++i) acc[i] = 0;
    for (int64_t k = 0; k < num_colors; ++k) {
      const opmath_t t = table[k * channels + c];
      const w_t* wk = w + k * w_ld;
      for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<opmath_t>(wk[i]) * t;
    }
    out_t* oc = out + c * out_ld;
    for (int64_t i = 0; i < n; ++i) oc[i] = static_cast<out_t>(acc[i]);
  }
}

// Soft backward for the n pixels of a tile (arrays strided by ld over k or c):
//   G[k] = grad_probs[k] + sum_c prob_grad_term(gq[c], palette[k,c], A[k,c], x[c])
//   grad_logits[k] = softmax_logit_grad(probs[k], G[k], sum_j probs[j] G[j], temperature)
// G holds num_colors * n values, dot n values.
template <typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void soft_backward_tile(
    const scalar_t* probs, const scalar_t* grad_probs, const scalar_t* grad_quantized,
    const scalar_t* image, int64_t ld, const opmath_t* palette, const opmath_t* adjoint,
    int64_t num_colors, int64_t channels, int64_t n, opmath_t temperature,
    scalar_t* grad_logits, opmath_t* G, opmath_t* dot) {
  for (int64_t i = 0; i < n; ++i) dot[i] = 0;
  for (int64_t k = 0; k < num_colors; ++k) {
    opmath_t* Gk = G + k * n;
    const scalar_t* gpk = grad_probs + k * ld;
    for (int64_t i = 0; i < n; ++i) Gk[i] = static_cast<opmath_t>(gpk[i]);
    for (int64_t c = 0; c < channels; ++c) {
      const opmath_t pkc = palette[k * channels + c];
      const opmath_t akc = adjoint[k * channels + c];
      const scalar_t* gqc = grad_quantized + c * ld;
      const scalar_t* xc = image + c * ld;
      for (int64_t i = 0; i < n; ++i) {
        Gk[i] += prob_grad_term(static_cast<opmath_t>(gqc[i]), pkc, akc,
                                static_cast<opmath_t>(xc[i]));
      }
    }
    const scalar_t* pk = probs + k * ld;
    for (int64_t i = 0; i < n; ++i) dot[i] += static_cast<opmath_t>(pk[i]) * Gk[i];
  }
  for (int64_t k = 0; k < num_colors; ++k) {
    const opmath_t* Gk = G + k * n;
    const scalar_t* pk = probs + k * ld;
    scalar_t* out = grad_logits + k * ld;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<scalar_t>(
          softmax_logit_grad(static_cast<opmath_t>(pk[i]), Gk[i], dot[i], temperature));
    }
  }
}

// Second stage of the soft ops: out[b,k,c] = weighted_mean(extra[b,k,c] +
// sum_chunks N, sum_chunks S, eps) from partial[b, chunk, k, 0 | 1+c], the
// chunks added in order. extra is null (forward: the palette) or the palette
// gradient (backward: the adjoint A).
template <typename opmath_t, typename extra_t>
void finalize_weighted_means(const opmath_t* partial, int64_t batch,
                             int64_t nc, int64_t num_colors, int64_t channels,
                             const extra_t* extra, opmath_t eps,
                             opmath_t* out) {
  const int64_t J = channels + 1;
  at::parallel_for(0, batch * num_colors, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / num_colors, k = bk % num_colors;
      const opmath_t* first = partial + (b * nc * num_colors + k) * J;
      opmath_t weight = 0;
      for (int64_t t = 0; t < nc; ++t) weight += first[t * num_colors * J];
      for (int64_t c = 0; c < channels; ++c) {
        opmath_t sum = extra ? static_cast<opmath_t>(extra[bk * channels + c])
                             : opmath_t(0);
        for (int64_t t = 0; t < nc; ++t) sum += first[t * num_colors * J + 1 + c];
        out[bk * channels + c] = weighted_mean(sum, weight, eps);
      }
    }
  });
}

// Throws IndexError if an index of the tile lies outside [0, num_colors).
inline void check_indices(const int64_t* index, int64_t n, int64_t num_colors) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(index[i] >= 0 && index[i] < num_colors,
                      "index_map holds the colour index ", index[i],
                      ", outside the palette's range [0, ", num_colors, ")");
  }
}

// Sums over the pixels of each colour index (indices already checked):
// counts[k] += #{i : index[i] == k};  sums[k*C + c] += sum_{index[i]==k} y[c*y_ld + i].
// Hard op: y = image (palette means). Render backward: y = grad_image.
template <typename y_t, typename opmath_t>
void accumulate_index_sums(const int64_t* index, const y_t* y, int64_t y_ld,
                           int64_t channels, int64_t n, opmath_t* sums,
                           int64_t* counts) {
  for (int64_t i = 0; i < n; ++i) ++counts[index[i]];
  for (int64_t c = 0; c < channels; ++c) {
    const y_t* yc = y + c * y_ld;
    for (int64_t i = 0; i < n; ++i) {
      sums[index[i] * channels + c] += static_cast<opmath_t>(yc[i]);
    }
  }
}

}  // namespace cpu
}  // namespace colorquant
