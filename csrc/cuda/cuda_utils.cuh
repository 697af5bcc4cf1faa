// Device helpers shared by the CUDA kernels of the colorquant ops: launch
// configuration, deterministic warp/block sums, and the two-stage per-colour
// pixel reduction that the soft palette (forward and backward), the hard
// palette and render_index_map_backward all reduce to.
//
// Determinism: no atomics anywhere. Every partial sum is owned by one fixed
// thread / warp / block and combined in a fixed order, so results are bitwise
// reproducible run to run, whatever the scheduling.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/color_math.h"

namespace colorquant {
namespace cuda_detail {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
// Pixels per block of the partial-sum kernel: large enough that the second
// stage has few partials to add, small enough to give many blocks per image.
constexpr int kTile = 1024;
// Channels handled at a time (C is arbitrary): the per-thread accumulators of
// one chunk stay in registers, the tile of one chunk in shared memory.
constexpr int kChunk = 4;
// Grid-stride loops cover any size, so grids can be capped; y is the CUDA
// limit of gridDim.y (used for the batch).
constexpr int64_t kMaxGridX = int64_t{1} << 20;
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n > 0 items.
inline unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(
      std::min(ceil_div(n, kThreads), kMaxGridX));
}

inline unsigned int capped(int64_t n, int64_t cap) {
  return static_cast<unsigned int>(std::min(n, cap));
}

template <typename T>
constexpr c10::ScalarType scalar_type_of() {
  return c10::CppTypeToScalarType<T>::value;
}

// Device-side min without relying on --expt-relaxed-constexpr for std::min.
__device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// Correctly rounded products that nvcc may not contract into an FMA: where a
// formula names an intermediate (z = temperature * logits), it is rounded
// exactly as on the CPU.
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}

__device__ __forceinline__ int64_t grid_stride_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride_step() {
  return static_cast<int64_t>(blockDim.x) * gridDim.x;
}

// Sum over the 32 lanes of a warp, result in lane 0. Fixed butterfly order;
// every lane must call it (warp-uniform control flow).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over a block of kThreads threads, result in thread 0. warp_sums is a
// __shared__ array of kWarps entries; all threads must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* warp_sums) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = warp_sum(lane < kWarps ? warp_sums[lane] : T(0));
  }
  __syncthreads();  // warp_sums may be reused right after
  return total;
}

// ---------------------------------------------------------------------------
// Per-colour pixel sums: for each image b and colour k
//   W[k]   = sum_p w(k,p)            N[k,c] = sum_p w(k,p) * y[c,p]
// with w either the soft probabilities or the indicator [index[p] == k].
// Stage 1 (partial_sums_kernel): one block per (b, tile of kTile pixels);
// stage 2 (finish_sums_kernel): one block per (b, k) adds the tiles' partials.
// Partials are laid out [B][K][C+1][num_tiles] (j = 0 is W, j = 1 + c is N)
// so that stage 2 reads them coalesced.
// ---------------------------------------------------------------------------

// Soft weights: probs [B,K,P].
template <typename scalar_t>
struct ProbWeights {
  static constexpr bool kIndicator = false;
  const scalar_t* probs;
};

// Hard weights: [index[b,p] == k] for index [B,P]. Selected by a branch, not
// multiplied by 0/1, so that an inf/NaN pixel of another colour cannot leak
// in as 0 * inf.
struct IndexWeights {
  static constexpr bool kIndicator = true;
  const int64_t* index;
};

template <typename scalar_t, typename acc_t, typename Weights>
__global__ void __launch_bounds__(kThreads)
    partial_sums_kernel(Weights weights, const scalar_t* __restrict__ y,
                        acc_t* __restrict__ partial, int64_t B, int64_t P,
                        int64_t K, int64_t C, int64_t num_tiles) {
  // The tile is re-read by every colour (K times), so it is staged once.
  __shared__ acc_t y_tile[kChunk][kTile];
  __shared__ int32_t index_tile[Weights::kIndicator ? kTile : 1];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t J = C + 1;

  // Loop bounds depend on blockIdx only: uniform, so __syncthreads is safe.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      const int64_t p0 = t * kTile;
      const int n = static_cast<int>(min_i64(kTile, P - p0));
      if constexpr (Weights::kIndicator) {
        // Out-of-range indices become -1 (matching no colour) before the
        // narrowing to int32, so no large index can alias a valid colour.
        const int64_t* index = weights.index + b * P + p0;
        for (int i = threadIdx.x; i < n; i += kThreads) {
          const int64_t v = index[i];
          index_tile[i] = (v >= 0 && v < K) ? static_cast<int32_t>(v) : -1;
        }
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int cc = static_cast<int>(min_i64(kChunk, C - c0));
        for (int j = 0; j < cc; ++j) {
          const scalar_t* y_row = y + (b * C + c0 + j) * P + p0;
          for (int i = threadIdx.x; i < n; i += kThreads) {
            y_tile[j][i] = static_cast<acc_t>(y_row[i]);
          }
        }
        __syncthreads();

        // Warp per colour, lanes over pixels: the fixed lane-strided order and
        // the fixed shuffle tree make each partial deterministic.
        for (int64_t k = warp; k < K; k += kWarps) {
          acc_t w_sum = acc_t(0);
          acc_t n_sum[kChunk];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) n_sum[j] = acc_t(0);

          if constexpr (Weights::kIndicator) {
            const int32_t k32 = static_cast<int32_t>(k);
            for (int i = lane; i < n; i += kWarpSize) {
              if (index_tile[i] == k32) {
                w_sum += acc_t(1);
#pragma unroll
                for (int j = 0; j < kChunk; ++j) {
                  if (j < cc) n_sum[j] += y_tile[j][i];
                }
              }
            }
          } else {
            const scalar_t* w_row = weights.probs + (b * K + k) * P + p0;
            for (int i = lane; i < n; i += kWarpSize) {
              const acc_t w = static_cast<acc_t>(w_row[i]);
              w_sum += w;
#pragma unroll
              for (int j = 0; j < kChunk; ++j) {
                if (j < cc) n_sum[j] += w * y_tile[j][i];
              }
            }
          }

          w_sum = warp_sum(w_sum);
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (j < cc) n_sum[j] = warp_sum(n_sum[j]);  // cc is warp-uniform
          }
          if (lane == 0) {
            acc_t* out = partial + (b * K + k) * J * num_tiles + t;
            if (c0 == 0) out[0] = w_sum;  // W does not depend on the chunk
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              if (j < cc) out[(1 + c0 + j) * num_tiles] = n_sum[j];
            }
          }
        }
        __syncthreads();  // tiles are overwritten by the next chunk / tile
      }
    }
  }
}

// How stage 2 turns (W, N) into the output entry.
enum class Finish {
  kWeightedMean,  // weighted_mean(extra + N, W, eps): soft palette / adjoint
  kMeanOrZero,    // mean_or_zero(N, count): hard palette
  kSum,           // N: render_index_map_backward
};

template <Finish kMode, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_sums_kernel(const acc_t* __restrict__ partial, int64_t B, int64_t K,
                       int64_t C, int64_t num_tiles,
                       const scalar_t* __restrict__ extra, acc_t eps,
                       scalar_t* __restrict__ out,
                       acc_t* __restrict__ out_acc) {
  // Hard counts are added as exact integers: each tile's count (<= kTile) is
  // exact in acc_t, the total over tiles may not be.
  using weight_t =
      std::conditional_t<kMode == Finish::kMeanOrZero, int64_t, acc_t>;
  __shared__ acc_t acc_scratch[kWarps];
  __shared__ weight_t weight_scratch[kWarps];
  const int64_t J = C + 1;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
      const acc_t* row = partial + (b * K + k) * J * num_tiles;
      weight_t weight = weight_t(0);
      if constexpr (kMode != Finish::kSum) {
        for (int64_t t = threadIdx.x; t < num_tiles; t += kThreads) {
          weight += static_cast<weight_t>(row[t]);
        }
        weight = block_sum(weight, weight_scratch);  // valid in thread 0
      }
      for (int64_t c = 0; c < C; ++c) {
        const acc_t* n_row = row + (1 + c) * num_tiles;
        acc_t n = acc_t(0);
        for (int64_t t = threadIdx.x; t < num_tiles; t += kThreads) {
          n += n_row[t];
        }
        n = block_sum(n, acc_scratch);
        if (threadIdx.x == 0) {
          const int64_t o = (b * K + k) * C + c;
          acc_t v;
          if constexpr (kMode == Finish::kWeightedMean) {
            v = weighted_mean(
                extra != nullptr ? static_cast<acc_t>(extra[o]) + n : n,
                weight, eps);
          } else if constexpr (kMode == Finish::kMeanOrZero) {
            v = mean_or_zero(n, weight);
          } else {
            v = n;
          }
          if (out != nullptr) out[o] = static_cast<scalar_t>(v);
          if (out_acc != nullptr) out_acc[o] = v;
        }
      }
    }
  }
}

// Both stages for images y [B,C,P] and weights over [B,K,P]; writes the
// [B,K,C] result to out (scalar_t) and/or out_acc (opmath copy), either may
// be null. extra [B,K,C] (kWeightedMean only) may be null (= 0). B > 0.
// P == 0 is valid: stage 2 then finishes empty sums (W = N = 0).
template <Finish kMode, typename scalar_t, typename Weights>
void colour_sums(Weights weights, const scalar_t* y, int64_t B, int64_t P,
                 int64_t K, int64_t C, const scalar_t* extra, double eps,
                 scalar_t* out, at::opmath_type<scalar_t>* out_acc,
                 const at::TensorOptions& device_options,
                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_tiles = ceil_div(P, kTile);
  // Freed when this returns: the caching allocator is stream-ordered, and
  // both kernels run on `stream`.
  const at::Tensor partial =
      at::empty({B * K * (C + 1) * num_tiles},
                device_options.dtype(scalar_type_of<acc_t>()));
  acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
  const unsigned int grid_y = capped(B, kMaxGridY);
  if (num_tiles > 0) {
    partial_sums_kernel<scalar_t, acc_t, Weights>
        <<<dim3(capped(num_tiles, kMaxGridX), grid_y), kThreads, 0, stream>>>(
            weights, y, partial_ptr, B, P, K, C, num_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finish_sums_kernel<kMode, scalar_t, acc_t>
      <<<dim3(capped(K, kMaxGridX), grid_y), kThreads, 0, stream>>>(
          partial_ptr, B, K, C, num_tiles, extra, static_cast<acc_t>(eps),
          out, out_acc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace colorquant
