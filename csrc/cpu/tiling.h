// Loop structure shared by the CPU kernels: (image, chunk) tasks run in
// parallel; inside a task, pixels are processed in tiles, and the soft
// kernels' tiles in blocks of kLanes pixels, with the pixel loop innermost so
// that it vectorizes. The arithmetic itself comes from common/color_math.h.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

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

// For helpers (and lambdas) of the tile loops, so that each clone gets its own
// copy, compiled for its instruction set.
#if defined(__GNUC__)
#define CQ_ALWAYS_INLINE inline __attribute__((always_inline))
#define CQ_LAMBDA_INLINE __attribute__((always_inline))
#else
#define CQ_ALWAYS_INLINE inline
#define CQ_LAMBDA_INLINE
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

// Runs f(task_begin, task_end) over the (image, chunk) tasks in parallel,
// once per thread, so that f can set up its scratch buffers once rather than
// per task; task = b * num_chunks + chunk indexes the per-task partial sums
// and chunk_of(task, ...) gives a task's image and pixels. work_per_pixel
// (e.g. K or K*C) only sets how many tasks a thread takes at least; results
// never depend on it.
template <typename F>
void parallel_for_chunk_ranges(int64_t batch, int64_t num_pixels, int64_t work_per_pixel,
                               const F& f) {
  const int64_t nc = num_chunks(num_pixels);
  const int64_t task_work =
      std::max<int64_t>(1, std::min(num_pixels, kChunkPixels) * work_per_pixel);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / task_work);
  at::parallel_for(0, batch * nc, grain, f);
}

struct Chunk {
  int64_t b, p0, p1;  // image, first pixel, one past the last pixel
};

inline Chunk chunk_of(int64_t task, int64_t nc, int64_t num_pixels) {
  const int64_t b = task / nc;
  const int64_t p0 = (task % nc) * kChunkPixels;
  return {b, p0, std::min(num_pixels, p0 + kChunkPixels)};
}

// Runs f(task, b, p_begin, p_end) for every (image b, chunk) task in parallel.
template <typename F>
void parallel_for_chunks(int64_t batch, int64_t num_pixels, int64_t work_per_pixel,
                         const F& f) {
  const int64_t nc = num_chunks(num_pixels);
  parallel_for_chunk_ranges(batch, num_pixels, work_per_pixel,
                            [&](int64_t begin, int64_t end) {
                              for (int64_t task = begin; task < end; ++task) {
                                const Chunk ch = chunk_of(task, nc, num_pixels);
                                f(task, ch.b, ch.p0, ch.p1);
                              }
                            });
}

// The tile of at most tile pixels that a thread works on after the one
// ending at pixel q_end of task's chunk, given that it runs the tasks up to
// task_end: the rest of the chunk, else the start of the next task's chunk.
// Only for prefetching; n == 0 when there is none.
struct Tile {
  int64_t b, q, n;  // image, first pixel, number of pixels
};

inline Tile tile_after(int64_t task, int64_t q_end, int64_t task_end, int64_t nc,
                       int64_t num_pixels, int64_t tile) {
  const Chunk ch = chunk_of(task, nc, num_pixels);
  if (q_end < ch.p1) return {ch.b, q_end, std::min(tile, ch.p1 - q_end)};
  if (task + 1 < task_end) {
    const Chunk next = chunk_of(task + 1, nc, num_pixels);
    return {next.b, next.p0, std::min(tile, next.p1 - next.p0)};
  }
  return {0, 0, 0};
}

// The channel count of the soft kernels as a template argument: kC > 0 fixes
// it at compile time, so that the channel loops unroll inside the vectorized
// pixel loops and per-channel sums stay in registers (RGB, the common case);
// kC == 0 takes it at run time (any C).
template <typename F>
void dispatch_channels(int64_t channels, const F& f) {
  if (channels == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

// static_cast<out_t>(x), in a form whose loops vectorize. c10's float ->
// bfloat16 conversion (round to nearest even, NaN -> 0x7FC0) branches on NaN,
// which keeps GCC from vectorizing any loop that stores bfloat16; this is the
// same rounding without the branch, so the bits are those of static_cast.
template <typename out_t, typename opmath_t>
CQ_ALWAYS_INLINE out_t round_to(opmath_t x) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<opmath_t, float>) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const uint32_t rounded = (bits + ((bits >> 16) & 1) + UINT32_C(0x7FFF)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(x != x ? UINT32_C(0x7FC0) : rounded),
                         c10::BFloat16::from_bits());
  } else {
    return static_cast<out_t>(x);
  }
}

// static_cast<opmath_t>(x), in a form whose loops vectorize: bfloat16 -> float
// is exact (the bits shifted up), written out because GCC does not vectorize
// c10's conversion operator in every loop.
template <typename opmath_t, typename in_t>
CQ_ALWAYS_INLINE opmath_t widen(in_t x) {
  if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<opmath_t, float>) {
    const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<opmath_t>(x);
  }
}

// Asks for row[0, n) to be brought into L2. The tile loops read the [K, P]
// tensors K rows at a time, one cache line per row and block of pixels: too
// many short streams for the hardware prefetchers, so each block prefetches
// its lines of the next tile.
template <typename T>
CQ_ALWAYS_INLINE void prefetch_row(const T* row, int64_t n) {
#if defined(__GNUC__)
  constexpr int64_t kPerLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kPerLine) __builtin_prefetch(row + i, 0, 2);
#endif
}

// The tile loops work on blocks of kLanes pixels, keeping the per-pixel
// values that run across the loop over colours (maxima, sums, dot products,
// channel accumulators) in registers: one vector register each with
// AVX-512, two with AVX2. Pixel sums are kept as kLanes partial sums (pixel
// i goes to lane i mod kLanes), added up in lane order at the end, so that
// they vectorize without the compiler reassociating anything: no sum depends
// on the instruction set.
constexpr int kLanes = 16;

// f(i0, m) for the blocks [i0, i0 + m) of n pixels: m is kLanes as a
// compile-time constant (the lane loops vectorize fully) except for a last,
// partial block.
template <typename F>
CQ_ALWAYS_INLINE void for_each_block(int64_t n, const F& f) {
  int64_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes) f(i0, std::integral_constant<int, kLanes>{});
  if (i0 < n) f(i0, static_cast<int>(n - i0));
}

// probs[k*ld + i] = softmax_k(temperature * logits[k*stride + i]) for the n
// pixels of a tile, also stored rounded to scalar_t in out[k*out_ld + i].
// next: the next tile's logits (n_next pixels, to prefetch).
template <typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void softmax_tile(const scalar_t* logits, int64_t stride, int64_t num_colors,
                                 int64_t n, opmath_t temperature, opmath_t* probs, int64_t ld,
                                 scalar_t* out, int64_t out_ld, const scalar_t* next,
                                 int64_t n_next) {
  for_each_block(n, [&](int64_t i0, auto m) CQ_LAMBDA_INLINE {
    const int64_t fetch = std::min<int64_t>(m, n_next - i0);
    opmath_t max_z[kLanes], inv_sum[kLanes];
#pragma omp simd
    for (int l = 0; l < m; ++l) {
      max_z[l] = temperature * static_cast<opmath_t>(logits[i0 + l]);
      inv_sum[l] = 0;
    }
    if (fetch > 0) prefetch_row(next + i0, fetch);
    for (int64_t k = 1; k < num_colors; ++k) {
      const scalar_t* lk = logits + k * stride + i0;
      if (fetch > 0) prefetch_row(next + k * stride + i0, fetch);
#pragma omp simd
      for (int l = 0; l < m; ++l) {
        const opmath_t z = temperature * static_cast<opmath_t>(lk[l]);
        max_z[l] = z > max_z[l] ? z : max_z[l];
      }
    }
    for (int64_t k = 0; k < num_colors; ++k) {
      const scalar_t* lk = logits + k * stride + i0;
      opmath_t* pk = probs + k * ld + i0;
#pragma omp simd
      for (int l = 0; l < m; ++l) {
        const opmath_t e = shifted_exp(temperature * static_cast<opmath_t>(lk[l]) - max_z[l]);
        pk[l] = e;
        inv_sum[l] += e;
      }
    }
#pragma omp simd
    for (int l = 0; l < m; ++l) inv_sum[l] = opmath_t(1) / inv_sum[l];
    for (int64_t k = 0; k < num_colors; ++k) {
      opmath_t* pk = probs + k * ld + i0;
      scalar_t* ok = out + k * out_ld + i0;
#pragma omp simd
      for (int l = 0; l < m; ++l) {
        const opmath_t p = pk[l] * inv_sum[l];
        pk[l] = p;
        ok[l] = round_to<scalar_t>(p);
      }
    }
  });
}

// s = sum_i w[i], t[c] = sum_i w[i] * y[c*y_ld + i] for c < NC.
template <int NC, typename w_t, typename y_t, typename opmath_t>
CQ_ALWAYS_INLINE void weighted_sums_in_lanes(const w_t* w, const y_t* y, int64_t y_ld,
                                             int64_t n, opmath_t& s, opmath_t* t) {
  opmath_t s_lanes[kLanes] = {}, t_lanes[NC][kLanes] = {};
  for_each_block(n, [&](int64_t i0, auto m) CQ_LAMBDA_INLINE {
#pragma omp simd
    for (int l = 0; l < m; ++l) {
      const opmath_t wi = static_cast<opmath_t>(w[i0 + l]);
      s_lanes[l] += wi;
      for (int c = 0; c < NC; ++c) {
        t_lanes[c][l] += wi * static_cast<opmath_t>(y[c * y_ld + i0 + l]);
      }
    }
  });
  s = 0;
  for (int l = 0; l < kLanes; ++l) s += s_lanes[l];
  for (int c = 0; c < NC; ++c) {
    t[c] = 0;
    for (int l = 0; l < kLanes; ++l) t[c] += t_lanes[c][l];
  }
}

// acc[k*(C+1)]     += sum_i w[k*w_ld + i]
// acc[k*(C+1)+1+c] += sum_i w[k*w_ld + i] * y[c*y_ld + i]
// Forward: w = probs, y = image. Backward: w = probs, y = grad_quantized.
// kC: see dispatch_channels; with kC == 0 one sweep per channel.
template <int kC, typename w_t, typename y_t, typename opmath_t>
CQ_SIMD_CLONES void accumulate_weighted_sums(const w_t* w, int64_t w_ld, const y_t* y,
                              int64_t y_ld, int64_t num_colors,
                              int64_t channels, int64_t n, opmath_t* acc) {
  for (int64_t k = 0; k < num_colors; ++k) {
    const w_t* wk = w + k * w_ld;
    opmath_t* acc_k = acc + k * (channels + 1);
    opmath_t s;
    if constexpr (kC > 0) {
      opmath_t t[kC];
      weighted_sums_in_lanes<kC>(wk, y, y_ld, n, s, t);
      acc_k[0] += s;
      for (int c = 0; c < kC; ++c) acc_k[1 + c] += t[c];
    } else {
      for (int64_t c = 0; c < channels; ++c) {
        opmath_t t;
        weighted_sums_in_lanes<1>(wk, y + c * y_ld, y_ld, n, s, &t);
        if (c == 0) acc_k[0] += s;
        acc_k[1 + c] += t;
      }
    }
  }
}

// out[c*out_ld + i] = sum_k w[k*w_ld + i] * table[k*C + c] for the n pixels of
// a tile: quantized from the palette (forward) and, with kC == 0, grad_image
// from the adjoint (backward). Colours are added in ascending order. kC: see
// dispatch_channels; with kC == 0 acc holds n values.
template <int kC, typename w_t, typename opmath_t, typename out_t>
CQ_SIMD_CLONES void mix_tile(const w_t* w, int64_t w_ld, const opmath_t* table,
                             int64_t num_colors, int64_t channels, int64_t n,
                             out_t* out, int64_t out_ld, opmath_t* acc) {
  if constexpr (kC > 0) {
    for_each_block(n, [&](int64_t i0, auto m) CQ_LAMBDA_INLINE {
      opmath_t sum[kC][kLanes] = {};
      for (int64_t k = 0; k < num_colors; ++k) {
        const w_t* wk = w + k * w_ld + i0;
        const opmath_t* t = table + k * kC;
#pragma omp simd
        for (int l = 0; l < m; ++l) {
          const opmath_t wl = static_cast<opmath_t>(wk[l]);
          for (int c = 0; c < kC; ++c) sum[c][l] += wl * t[c];
        }
      }
      for (int c = 0; c < kC; ++c) {
#pragma omp simd
        for (int l = 0; l < m; ++l) out[c * out_ld + i0 + l] = round_to<out_t>(sum[c][l]);
      }
    });
  } else {
    for (int64_t c = 0; c < channels; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) acc[i] = 0;
      for (int64_t k = 0; k < num_colors; ++k) {
        const opmath_t t = table[k * channels + c];
        const w_t* wk = w + k * w_ld;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<opmath_t>(wk[i]) * t;
      }
      out_t* oc = out + c * out_ld;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) oc[i] = round_to<out_t>(acc[i]);
    }
  }
}

// Soft backward for the n pixels of a tile (arrays strided by ld over k or c,
// grad_probs by gp_ld: 0 makes every colour read one row of zeros when
// grad_probs is absent):
//   G[k] = grad_probs[k] + sum_c prob_grad_term(gq[c], palette[k,c], A[k,c], x[c])
//   grad_logits[k] = softmax_logit_grad(probs[k], G[k], sum_j probs[j] G[j], temperature)
//   grad_image[c] = sum_k A[k,c] probs[k]   (colours in ascending order, as mix_tile)
// kC: see dispatch_channels. work holds kLanes * num_colors values (kC > 0)
// or (num_colors + 1) * n (kC == 0). next_probs, next_grad_probs: the next
// tile's (n_next pixels, to prefetch).
template <int kC, typename scalar_t, typename opmath_t>
CQ_SIMD_CLONES void soft_backward_tile(
    const scalar_t* probs, const scalar_t* grad_probs, int64_t gp_ld,
    const scalar_t* grad_quantized, const scalar_t* image, int64_t ld, const opmath_t* palette,
    const opmath_t* adjoint, int64_t num_colors, int64_t channels, int64_t n,
    opmath_t temperature, scalar_t* grad_logits, scalar_t* grad_image, opmath_t* work,
    const scalar_t* next_probs, const scalar_t* next_grad_probs, int64_t n_next) {
  if constexpr (kC > 0) {
    for_each_block(n, [&](int64_t i0, auto m) CQ_LAMBDA_INLINE {
      const int64_t fetch = std::min<int64_t>(m, n_next - i0);
      opmath_t gi[kC][kLanes] = {}, dot[kLanes] = {};
      const scalar_t* gq = grad_quantized + i0;
      const scalar_t* x = image + i0;
      opmath_t* G = work;  // [num_colors][kLanes]
      for (int64_t k = 0; k < num_colors; ++k) {
        const scalar_t* gpk = grad_probs + k * gp_ld + i0;
        const scalar_t* pk = probs + k * ld + i0;
        opmath_t* Gk = G + k * kLanes;
        // Copies: G could alias the tables for all the compiler knows.
        opmath_t pal_k[kC], adj_k[kC];
        for (int c = 0; c < kC; ++c) {
          pal_k[c] = palette[k * kC + c];
          adj_k[c] = adjoint[k * kC + c];
        }
        if (fetch > 0) {
          if (gp_ld > 0) prefetch_row(next_grad_probs + k * gp_ld + i0, fetch);
          prefetch_row(next_probs + k * ld + i0, fetch);
        }
#pragma omp simd
        for (int l = 0; l < m; ++l) {
          opmath_t g = static_cast<opmath_t>(gpk[l]);
          for (int c = 0; c < kC; ++c) {
            g += prob_grad_term(static_cast<opmath_t>(gq[c * ld + l]), pal_k[c], adj_k[c],
                                static_cast<opmath_t>(x[c * ld + l]));
          }
          Gk[l] = g;
          const opmath_t p = static_cast<opmath_t>(pk[l]);
          dot[l] += p * g;
          for (int c = 0; c < kC; ++c) gi[c][l] += p * adj_k[c];
        }
      }
      for (int64_t k = 0; k < num_colors; ++k) {
        const scalar_t* pk = probs + k * ld + i0;
        scalar_t* out = grad_logits + k * ld + i0;
#pragma omp simd
        for (int l = 0; l < m; ++l) {
          out[l] = round_to<scalar_t>(softmax_logit_grad(static_cast<opmath_t>(pk[l]),
                                                         G[k * kLanes + l], dot[l], temperature));
        }
      }
      for (int c = 0; c < kC; ++c) {
#pragma omp simd
        for (int l = 0; l < m; ++l) grad_image[c * ld + i0 + l] = round_to<scalar_t>(gi[c][l]);
      }
    });
  } else {
    opmath_t* G = work;  // [num_colors][n]
    opmath_t* dot = work + num_colors * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dot[i] = 0;
    for (int64_t k = 0; k < num_colors; ++k) {
      opmath_t* Gk = G + k * n;
      const scalar_t* gpk = grad_probs + k * gp_ld;
      const scalar_t* pk = probs + k * ld;
      if (n_next > 0) {
        if (gp_ld > 0) prefetch_row(next_grad_probs + k * gp_ld, n_next);
        prefetch_row(next_probs + k * ld, n_next);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) Gk[i] = static_cast<opmath_t>(gpk[i]);
      for (int64_t c = 0; c < channels; ++c) {
        const opmath_t pkc = palette[k * channels + c];
        const opmath_t akc = adjoint[k * channels + c];
        const scalar_t* gqc = grad_quantized + c * ld;
        const scalar_t* xc = image + c * ld;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          Gk[i] += prob_grad_term(static_cast<opmath_t>(gqc[i]), pkc, akc,
                                  static_cast<opmath_t>(xc[i]));
        }
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dot[i] += static_cast<opmath_t>(pk[i]) * Gk[i];
    }
    for (int64_t k = 0; k < num_colors; ++k) {
      const opmath_t* Gk = G + k * n;
      const scalar_t* pk = probs + k * ld;
      scalar_t* out = grad_logits + k * ld;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        out[i] = round_to<scalar_t>(
            softmax_logit_grad(static_cast<opmath_t>(pk[i]), Gk[i], dot[i], temperature));
      }
    }
    mix_tile<0>(probs, ld, adjoint, num_colors, channels, n, grad_image, ld, dot);
  }
}

// Second stage of the soft ops, for one image:
// out[k,c] = weighted_mean(extra[k,c] + sum_chunks N, sum_chunks S, eps) from
// partial[chunk, k, 0 | 1+c] (S | N), the chunks added in order. extra is
// null (forward: the palette) or the palette gradient (backward: the adjoint A).
template <typename opmath_t, typename extra_t>
void weighted_means(const opmath_t* partial, int64_t nc, int64_t num_colors,
                    int64_t channels, const extra_t* extra, opmath_t eps, opmath_t* out) {
  const int64_t J = channels + 1;
  for (int64_t k = 0; k < num_colors; ++k) {
    const opmath_t* first = partial + k * J;
    opmath_t weight = 0;
    for (int64_t t = 0; t < nc; ++t) weight += first[t * num_colors * J];
    for (int64_t c = 0; c < channels; ++c) {
      opmath_t sum = extra ? static_cast<opmath_t>(extra[k * channels + c]) : opmath_t(0);
      for (int64_t t = 0; t < nc; ++t) sum += first[t * num_colors * J + 1 + c];
      out[k * channels + c] = weighted_mean(sum, weight, eps);
    }
  }
}

// Throws IndexError if an index of the tile lies outside [0, num_colors).
inline void check_indices(const int64_t* index, int64_t n, int64_t num_colors) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(index[i] >= 0 && index[i] < num_colors,
                      "index_map holds the colour index ", index[i],
                      ", outside the palette's range [0, ", num_colors, ")");
  }
}

// Sums over the pixels of each colour index, in one pass over the indices:
// counts[k] += #{i : index[i] == k};  sums[k*C + c] += sum_{index[i]==k} y[c*y_ld + i]
// (kC > 0: C fixed at compile time, see dispatch_channels). Each sum runs in
// pixel order. Returns false if an index lies outside [0, num_colors): it is
// counted as colour 0, and the caller raises the error (check_indices).
// Hard op: y = image (palette means). Render backward: y = grad_image.
template <int kC, typename y_t, typename opmath_t>
bool accumulate_index_sums(const int64_t* index, const y_t* y, int64_t y_ld, int64_t channels,
                           int64_t num_colors, int64_t n, opmath_t* sums, int64_t* counts) {
  const int64_t C = kC > 0 ? kC : channels;
  bool valid = true;
  for (int64_t i = 0; i < n; ++i) {
    int64_t k = index[i];
    if (k < 0 || k >= num_colors) {
      valid = false;
      k = 0;
    }
    ++counts[k];
    for (int64_t c = 0; c < C; ++c) sums[k * C + c] += static_cast<opmath_t>(y[c * y_ld + i]);
  }
  return valid;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define CQ_HAVE_AVX512_LOOKUP 1

inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// Palettes of at most this many colours are looked up with AVX-512 permutes.
// Beyond 64 the permutes and merges per pixel (8 + 7 per channel at K = 256)
// cost more than scalar loads on Zen 4 (measured: 2x slower at K = 256).
constexpr int64_t kMaxRegisterColours = 64;

// The 16 lanes of entry (< 32 * kBlocks, kBlocks = 1 or 2) looked up in
// row[0 .. 32 * kBlocks): one vpermt2d (which reads 5 index bits) per block of
// 32 entries, the two blocks' results merged by index bit 5.
template <int kBlocks>
__attribute__((target("avx512f"), always_inline)) inline __m512i lookup_row(const uint32_t* row,
                                                                           __m512i entry) {
  static_assert(kBlocks == 1 || kBlocks == 2, "32 or 64 entries");
  const __m512i low = _mm512_permutex2var_epi32(_mm512_loadu_si512(row), entry,
                                                _mm512_loadu_si512(row + 16));
  if constexpr (kBlocks == 1) {
    return low;
  } else {
    const __m512i high = _mm512_permutex2var_epi32(_mm512_loadu_si512(row + 32), entry,
                                                   _mm512_loadu_si512(row + 48));
    return _mm512_mask_blend_epi32(_mm512_test_epi32_mask(entry, _mm512_set1_epi32(32)), low, high);
  }
}

// gather_palette's first n - n % 16 pixels, 16 per step, for palettes of at
// most kMaxRegisterColours colours of 16- or 32-bit entries (bfloat16, half,
// float): each channel's colours form a row of 32 * kBlocks 32-bit words,
// where lane permutes look 16 indices up at once (lookup_row); the entries
// move as raw bits, 16-bit ones widened and narrowed again. GCC does not
// vectorize the lookup in gather_palette (it emits no gathers when tuning for
// generic x86-64, and on Zen 4 a gather is slower than scalar loads anyway).
// An index outside [0, num_colors) reads colour 0 and sets *invalid. Returns
// the number of pixels rendered.
template <int kBlocks, typename scalar_t>
__attribute__((target("avx512f"))) int64_t gather_palette_avx512_blocks(
    const int64_t* index, const scalar_t* palette, int64_t channels, int64_t num_colors, int64_t n,
    scalar_t* out, int64_t out_ld, bool* invalid) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;
  constexpr int64_t row = 32 * kBlocks;
  std::vector<uint32_t> rows(channels * row, 0);  // rows[c*row + k]: colour k's channel c
  for (int64_t k = 0; k < num_colors; ++k) {
    for (int64_t c = 0; c < channels; ++c) {
      bits_t bits;
      std::memcpy(&bits, palette + k * channels + c, sizeof(bits));
      rows[c * row + k] = bits;
    }
  }
  const __m512i limit = _mm512_set1_epi64(num_colors);
  const __m512i low_halves =
      _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __mmask8 bad = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i lo = _mm512_loadu_si512(index + i);
    const __m512i hi = _mm512_loadu_si512(index + i + 8);
    const __mmask8 ok_lo = _mm512_cmplt_epu64_mask(lo, limit);  // unsigned: negatives fail too
    const __mmask8 ok_hi = _mm512_cmplt_epu64_mask(hi, limit);
    bad |= static_cast<__mmask8>(~ok_lo | ~ok_hi);
    // The low halves of the 16 indices (0 where out of range), in order.
    const __m512i entry = _mm512_permutex2var_epi32(_mm512_maskz_mov_epi64(ok_lo, lo), low_halves,
                                                    _mm512_maskz_mov_epi64(ok_hi, hi));
    for (int64_t c = 0; c < channels; ++c) {
      const __m512i v = lookup_row<kBlocks>(rows.data() + c * row, entry);
      scalar_t* dst = out + c * out_ld + i;
      if constexpr (sizeof(scalar_t) == 4) {
        _mm512_storeu_si512(dst, v);
      } else {
        _mm512_mask_cvtepi32_storeu_epi16(dst, 0xFFFF, v);  // narrows the 16 words
      }
    }
  }
  if (bad) *invalid = true;
  return i;
}

// gather_palette_avx512_blocks with the fewest blocks that hold the palette,
// where it applies (16- or 32-bit entries, at most kMaxRegisterColours
// colours, n >= 16, a CPU with AVX-512); else renders nothing and returns 0.
template <typename scalar_t>
int64_t gather_small_palette_avx512(const int64_t* index, const scalar_t* palette,
                                    int64_t channels, int64_t num_colors, int64_t n,
                                    scalar_t* out, int64_t out_ld, bool* invalid) {
  if constexpr (sizeof(scalar_t) != 2 && sizeof(scalar_t) != 4) {
    return 0;
  } else {
    if (n < 16 || num_colors > kMaxRegisterColours || !cpu_has_avx512f()) return 0;
    static_assert(kMaxRegisterColours == 64, "one or two blocks of 32 colours");
    if (num_colors <= 32) {
      return gather_palette_avx512_blocks<1>(index, palette, channels, num_colors, n, out, out_ld,
                                             invalid);
    }
    return gather_palette_avx512_blocks<2>(index, palette, channels, num_colors, n, out, out_ld,
                                           invalid);
  }
}
#endif

// out[c*out_ld + i] = palette[index[i]*C + c] for the n pixels of a chunk, in
// one pass over the indices (through gather_small_palette_avx512 where it
// applies, the rest here). Returns false if an index lies outside
// [0, num_colors) (its pixel gets colour 0; the caller raises the error).
template <int kC, typename scalar_t>
CQ_SIMD_CLONES bool gather_palette(const int64_t* index, const scalar_t* palette, int64_t channels,
                                   int64_t num_colors, int64_t n, scalar_t* out, int64_t out_ld) {
  const int64_t C = kC > 0 ? kC : channels;
  bool invalid_lookup = false;
  int64_t done = 0;  // pixels rendered by the AVX-512 lookup
#ifdef CQ_HAVE_AVX512_LOOKUP
  done = gather_small_palette_avx512(index, palette, C, num_colors, n, out, out_ld, &invalid_lookup);
#endif
  int64_t invalid = invalid_lookup;
#pragma omp simd reduction(| : invalid)
  for (int64_t i = done; i < n; ++i) {
    const int64_t k = index[i];
    const bool ok = k >= 0 && k < num_colors;
    invalid |= !ok;
    const scalar_t* colour = palette + (ok ? k : 0) * C;
    for (int64_t c = 0; c < C; ++c) out[c * out_ld + i] = colour[c];
  }
  return invalid == 0;
}

}  // namespace cpu
}  // namespace colorquant
