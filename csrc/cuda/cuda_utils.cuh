// Device helpers shared by the CUDA kernels of the colorquant ops: launch
// configuration, deterministic warp sums, a stable counting sort of a tile's
// pixels by colour, and the two-stage per-colour pixel reduction that the soft
// palette (forward and backward), the hard palette and
// render_index_map_backward all reduce to.
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

#include "common/checks.h"
#include "common/color_math.h"

// __match_any_sync (sort_tile_by_colour) needs Volta or newer.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "colorquant_ops' CUDA kernels need compute capability 7.0 or newer (TORCH_CUDA_ARCH_LIST)"
#endif

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

// Stages channels [c0, c0 + cc) of pixels [p0, p0 + n) of image b of a
// [B, C, P] tensor into a shared tile, converted to acc_t: the tile kernels
// re-read it once per colour. Every thread of the block takes part; the
// caller synchronises before reading the tile.
template <typename scalar_t, typename acc_t, int kWidth>
__device__ __forceinline__ void stage_channel_tile(acc_t (&tile)[kChunk][kWidth],
                                                   const scalar_t* __restrict__ src, int64_t b,
                                                   int64_t C, int64_t c0, int cc, int64_t P,
                                                   int64_t p0, int n) {
  for (int j = 0; j < cc; ++j) {
    const scalar_t* row = src + (b * C + c0 + j) * P + p0;
    for (int i = threadIdx.x; i < n; i += kThreads) tile[j][i] = static_cast<acc_t>(row[i]);
  }
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

// ---------------------------------------------------------------------------
// Stable counting sort of one tile's pixels by colour index (shared memory).
//
// The index-based reductions (hard palette, render_index_map_backward, the
// k-means cluster sums) add each pixel to one colour only. Scanning the tile
// once per colour would do K times the needed work; instead the tile is
// sorted by colour once -- stably, so each colour's pixels stay in pixel
// order -- and a thread (k-means) or a group of lanes (index_partial_sums_kernel)
// per colour then adds exactly its own pixels. No atomics: ranks come from __match_any_sync groups within a warp
// (a pixel's rank is the number of earlier pixels of its colour), and offsets
// from an exclusive scan over (colour, warp) in fixed order.
// ---------------------------------------------------------------------------

static_assert(kThreads == kMaxColors, "sort_tile_by_colour: a thread per colour");
static_assert(kTile % (kWarps * kWarpSize) == 0, "sort_tile_by_colour: whole warp rounds");
static_assert(kTile <= 65535, "sort_tile_by_colour: positions in uint16_t");

struct TileSort {
  static constexpr int kPerWarp = kTile / kWarps;  // pixels owned by each warp
  int16_t key[kTile];        // colour of pixel i, -1: none (out of range)
  uint16_t rank[kTile];      // rank of pixel i among its warp's pixels of its colour
  uint16_t order[kTile];     // pixels sorted by colour, pixel order within a colour
  uint16_t offset[kWarps][kMaxColors];  // per-warp counts, then start offsets
  uint16_t start[kMaxColors + 1];       // colour k: order[start[k] .. start[k+1])
  int32_t warp_totals[kWarps];
};

// Sorts pixels [0, n) of the tile by s.key (filled by the caller, n <= kTile,
// keys in [0, K) or -1). All threads of the block must call it (it
// synchronizes); the caller must __syncthreads after its last read of s and
// before it refills s.key for the next tile.
__device__ __forceinline__ void sort_tile_by_colour(TileSort& s, int n, int K) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  uint16_t* counts = &s.offset[0][0];
  for (int i = threadIdx.x; i < kWarps * kMaxColors; i += kThreads) counts[i] = 0;
  __syncthreads();  // also publishes the caller's keys

  // Ranks within each warp's pixels, 32 at a time in pixel order: the lanes
  // holding one colour form a group; a lane's rank is the number of lower
  // lanes of its group plus the count so far, which the group's lowest lane
  // then advances. The loop is warp-uniform (every lane runs every round).
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int r = 0; r < TileSort::kPerWarp; r += kWarpSize) {
    const int i = warp * TileSort::kPerWarp + r + lane;
    const int k = i < n ? s.key[i] : -1;
    const unsigned group = __match_any_sync(0xffffffffu, k);
    const int base = k >= 0 ? s.offset[warp][k] : 0;
    __syncwarp();  // every lane has read its count before the group leader writes it
    if (k >= 0) {
      s.rank[i] = static_cast<uint16_t>(base + __popc(group & lower_lanes));
      if ((group & lower_lanes) == 0) {
        s.offset[warp][k] = static_cast<uint16_t>(base + __popc(group));
      }
    }
    __syncwarp();
  }
  __syncthreads();

  // Thread k: colour k's total, its start (exclusive scan over colours in
  // order: warp shuffles, then the warps' totals), then per-warp offsets.
  const int k = threadIdx.x;
  int total = 0;
  if (k < K) {
    for (int w = 0; w < kWarps; ++w) total += s.offset[w][k];
  }
  int inclusive = total;
#pragma unroll
  for (int o = 1; o < kWarpSize; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  if (lane == kWarpSize - 1) s.warp_totals[warp] = inclusive;
  __syncthreads();
  int begin = inclusive - total;
  for (int w = 0; w < warp; ++w) begin += s.warp_totals[w];
  if (k < K) {
    int off = begin;
    for (int w = 0; w < kWarps; ++w) {
      const int c = s.offset[w][k];
      s.offset[w][k] = static_cast<uint16_t>(off);
      off += c;
    }
    s.start[k] = static_cast<uint16_t>(begin);
    if (k == K - 1) s.start[K] = static_cast<uint16_t>(begin + total);
  }
  __syncthreads();

  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int key = s.key[i];
    if (key >= 0) s.order[s.offset[i / TileSort::kPerWarp][key] + s.rank[i]] = static_cast<uint16_t>(i);
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Per-colour pixel sums: for each image b and colour k
//   W[k]   = sum_p w(k,p)            N[k,c] = sum_p w(k,p) * y[c,p]
// with w either the soft probabilities or the indicator [index[p] == k].
// Stage 1: one block per (b, tile of kTile pixels) writes the tile's partial
// sums -- soft_partial_sums_kernel (a warp per colour: every (k, p) pair has
// a weight) or index_partial_sums_kernel (one sort of the tile, then a group
// of lanes per colour over that colour's pixels only). Stage 2 (finish_sums_kernel): a thread, or a
// warp when there are many tiles, per output entry adds the tiles' partials.
// Partials are laid out [B][K][C+1][num_tiles] (j = 0 is W, j = 1 + c is N).
// ---------------------------------------------------------------------------

// Soft weights read from probs [B,K,P] as stored (float32/float64 forward,
// every backward: the backward weights by the probs the forward returned and
// saved, as the CPU kernel does).
template <typename T>
struct ProbWeights {
  static constexpr bool kIndicator = false;
  const T* probs;
  template <typename acc_t>
  __device__ __forceinline__ acc_t at(int64_t b, int64_t k, int64_t p, int64_t K,
                                      int64_t P) const {
    return static_cast<acc_t>(probs[(b * K + k) * P + p]);
  }
};

// Soft weights recomputed in the accumulation type from the logits and the
// per-pixel softmax statistics stats [B][2][P] (max of z, 1 / denominator)
// that softmax_kernel stored: the float16/bfloat16 forward sums the palette
// from the float32 probabilities, exactly the values it rounds into probs,
// so a probability that underflows in the stored dtype still counts (as on
// the CPU), without a float32 [B,K,P] copy.
template <typename T, typename acc_t_>
struct SoftmaxWeights {
  static constexpr bool kIndicator = false;
  const T* logits;
  const acc_t_* stats;
  acc_t_ temperature;
  template <typename acc_t>
  __device__ __forceinline__ acc_t at(int64_t b, int64_t k, int64_t p, int64_t K,
                                      int64_t P) const {
    static_assert(std::is_same_v<acc_t, acc_t_>, "SoftmaxWeights: one accumulation type");
    const acc_t_* s = stats + 2 * b * P;
    const acc_t z = mul_rn(temperature, static_cast<acc_t>(logits[(b * K + k) * P + p]));
    return softmax_prob(z, s[p], s[P + p]);
  }
};

// Hard weights: [index[b,p] == k] for index [B,P]. A pixel is added to its
// colour's sums only (never multiplied by 0/1, so an inf/NaN pixel of another
// colour cannot leak in as 0 * inf); an index outside [0, K) counts nowhere.
struct IndexWeights {
  static constexpr bool kIndicator = true;
  const int64_t* index;
};

template <typename scalar_t, typename acc_t, typename Weights>
__global__ void __launch_bounds__(kThreads)
    soft_partial_sums_kernel(Weights weights, const scalar_t* __restrict__ y,
                             acc_t* __restrict__ partial, int64_t B, int64_t P,
                             int64_t K, int64_t C, int64_t num_tiles) {
  // The tile is re-read by every colour (K times), so it is staged once.
  __shared__ acc_t y_tile[kChunk][kTile];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t J = C + 1;

  // Loop bounds depend on blockIdx only: uniform, so __syncthreads is safe.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      const int64_t p0 = t * kTile;
      const int n = static_cast<int>(min_i64(kTile, P - p0));
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int cc = static_cast<int>(min_i64(kChunk, C - c0));
        stage_channel_tile(y_tile, y, b, C, c0, cc, P, p0, n);
        __syncthreads();

        // Warp per colour, lanes over pixels: the fixed lane-strided order and
        // the fixed shuffle tree make each partial deterministic.
        for (int64_t k = warp; k < K; k += kWarps) {
          acc_t w_sum = acc_t(0);
          acc_t n_sum[kChunk];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) n_sum[j] = acc_t(0);
          for (int i = lane; i < n; i += kWarpSize) {
            const acc_t w = weights.template at<acc_t>(b, k, p0 + i, K, P);
            w_sum += w;
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              if (j < cc) n_sum[j] += w * y_tile[j][i];
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
        __syncthreads();  // y_tile is overwritten by the next chunk / tile
      }
    }
  }
}

// Lanes per colour of index_partial_sums_kernel: the largest power of two up
// to a warp with K * group <= kThreads, so that all colours are summed at
// once and no thread idles however few colours there are (K = 2: a warp
// each; K = 256: a thread each).
inline int index_sum_group(int64_t K) {
  int group = kWarpSize;
  while (group > 1 && K * group > kThreads) group /= 2;
  return group;
}

// Stage 1 of the index sums: the tile is sorted by colour once, then a group
// of `group` lanes (index_sum_group) per colour adds that colour's pixels,
// lane-strided over its sorted run (in pixel order), then a fixed shuffle
// tree within the group: each pixel is read once per channel chunk, and the
// order depends only on the indices, so the partials are deterministic.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    index_partial_sums_kernel(IndexWeights weights, const scalar_t* __restrict__ y,
                              acc_t* __restrict__ partial, int64_t B, int64_t P,
                              int64_t K, int64_t C, int64_t num_tiles, int group) {
  __shared__ TileSort sort;
  __shared__ acc_t y_tile[kChunk][kTile];
  const int64_t J = C + 1;
  const int k = threadIdx.x / group;   // this thread's colour (none if k >= K)
  const int member = threadIdx.x % group;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      const int64_t p0 = t * kTile;
      const int n = static_cast<int>(min_i64(kTile, P - p0));
      const int64_t* index = weights.index + b * P + p0;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const int64_t v = index[i];
        sort.key[i] = (v >= 0 && v < K) ? static_cast<int16_t>(v) : int16_t{-1};
      }
      sort_tile_by_colour(sort, n, static_cast<int>(K));
      const int begin = k < K ? sort.start[k] : 0;
      const int end = k < K ? sort.start[k + 1] : 0;
      const bool writer = k < K && member == 0;
      acc_t* out = writer ? partial + (b * K + k) * J * num_tiles + t : nullptr;
      // A count of at most kTile is exact in acc_t.
      if (writer) out[0] = static_cast<acc_t>(end - begin);
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int cc = static_cast<int>(min_i64(kChunk, C - c0));
        stage_channel_tile(y_tile, y, b, C, c0, cc, P, p0, n);
        __syncthreads();
        acc_t s[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) s[j] = acc_t(0);
        for (int e = begin + member; e < end; e += group) {
          const int i = sort.order[e];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (j < cc) s[j] += y_tile[j][i];
          }
        }
        // Groups never straddle a warp (group divides 32); every lane takes
        // part in the shuffles (the loop bound is block-uniform).
        for (int offset = group / 2; offset > 0; offset >>= 1) {
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            s[j] += __shfl_down_sync(0xffffffffu, s[j], offset, group);
          }
        }
        if (writer) {
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (j < cc) out[(1 + c0 + j) * num_tiles] = s[j];
          }
        }
        __syncthreads();  // y_tile (and, after the last chunk, sort) are reused
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

// Stage 2: kGroup threads (1, or a warp) per output entry (b, k, c) add its
// num_tiles partials in a fixed order (a thread in tile order; a warp
// lane-strided, then the shuffle tree). The group size depends on num_tiles
// only: few tiles (e.g. CIFAR, one tile per image) get a thread per entry, so
// that no thread idles; many tiles get a warp per entry, with coalesced reads.
template <Finish kMode, int kGroup, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_sums_kernel(const acc_t* __restrict__ partial, int64_t B, int64_t K,
                       int64_t C, int64_t num_tiles,
                       const scalar_t* __restrict__ extra, acc_t eps,
                       scalar_t* __restrict__ out,
                       acc_t* __restrict__ out_acc) {
  static_assert(kGroup == 1 || kGroup == kWarpSize, "finish_sums_kernel: group of 1 or a warp");
  // Hard counts are added as exact integers: each tile's count (<= kTile) is
  // exact in acc_t, the total over tiles may not be.
  using weight_t =
      std::conditional_t<kMode == Finish::kMeanOrZero, int64_t, acc_t>;
  const int64_t J = C + 1;
  const int member = kGroup == 1 ? 0 : static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t num_out = B * K * C;
  // Warp-uniform for kGroup == kWarpSize (kThreads is a multiple of 32).
  for (int64_t o = grid_stride_start() / kGroup; o < num_out; o += grid_stride_step() / kGroup) {
    const int64_t bk = o / C;
    const int64_t c = o - bk * C;
    const acc_t* row = partial + bk * J * num_tiles;
    const acc_t* n_row = row + (1 + c) * num_tiles;
    weight_t weight = weight_t(0);
    acc_t n = acc_t(0);
    for (int64_t t = member; t < num_tiles; t += kGroup) {
      if constexpr (kMode != Finish::kSum) weight += static_cast<weight_t>(row[t]);
      n += n_row[t];
    }
    if constexpr (kGroup > 1) {
      if constexpr (kMode != Finish::kSum) weight = warp_sum(weight);
      n = warp_sum(n);
    }
    if (member == 0) {
      acc_t v;
      if constexpr (kMode == Finish::kWeightedMean) {
        v = weighted_mean(extra != nullptr ? static_cast<acc_t>(extra[o]) + n : n, weight, eps);
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

// Tiles from which stage 2 uses a warp per entry.
constexpr int64_t kWarpFinishTiles = 32;

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
    const dim3 grid(capped(num_tiles, kMaxGridX), grid_y);
    if constexpr (Weights::kIndicator) {
      index_partial_sums_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          weights, y, partial_ptr, B, P, K, C, num_tiles, index_sum_group(K));
    } else {
      soft_partial_sums_kernel<scalar_t, acc_t, Weights>
          <<<grid, kThreads, 0, stream>>>(weights, y, partial_ptr, B, P, K, C, num_tiles);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t num_out = B * K * C;
  if (num_tiles >= kWarpFinishTiles) {
    finish_sums_kernel<kMode, kWarpSize, scalar_t, acc_t>
        <<<grid_for(num_out * kWarpSize), kThreads, 0, stream>>>(
            partial_ptr, B, K, C, num_tiles, extra, static_cast<acc_t>(eps), out, out_acc);
  } else {
    finish_sums_kernel<kMode, 1, scalar_t, acc_t>
        <<<grid_for(num_out), kThreads, 0, stream>>>(
            partial_ptr, B, K, C, num_tiles, extra, static_cast<acc_t>(eps), out, out_acc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail
}  // namespace colorquant
