// CUDA kernel of colorquant::kmeans_palette. Same algorithm, same arithmetic
// (common/palette_math.h) and same summation order as the CPU kernel
// (cpu/kmeans.cpp), so both devices return the same result for a seed:
//
// k-means++ seeding, for each centre j (all images at once):
//   kmeanspp_d2_kernel   thread per pixel: D^2 after centre j-1 (float64);
//   chunk_sums_kernel    thread per (image, chunk of kKMeansChunk pixels):
//                        the chunk's D^2 summed in pixel order;
//   pick_centre_kernel   thread per image: the inverse-CDF draw (kmeanspp_draw),
//                        sequential over the chunk totals, then one chunk.
// Lloyd iteration:
//   assign_kernel        thread per pixel: nearest centre (centres in shared
//                        memory), flags images whose assignment changed;
//   cluster_sums_kernel  block per (image, chunk): the chunk sorted by colour
//                        (stable, in shared memory), then a thread per colour
//                        adds its own pixels' channels, in pixel order;
//   centres_kernel       thread per (image, colour): chunk sums added in chunk
//                        order, then the mean (or the previous centre).
// Then the centres are rounded to the image dtype (the returned palette) and
// a final assign_kernel maps every pixel to them.
//
// Determinism: no floating-point atomics; every sum has one owner thread and a
// fixed order. The only concurrent writes are the "changed" flags, where all
// writers store the same value 1.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "common/checks.h"
#include "common/palette_math.h"
#include "cuda/cuda_utils.cuh"

namespace colorquant {
namespace {

using namespace cuda_detail;

// Centres of one image are staged in shared memory if they fit in this much
// (the default dynamic shared memory limit, no opt-in needed).
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// ---------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------

// Centre j of every image: the pixel of draw j (uniform for j == 0, else the
// k-means++ draw over d2 / chunk_sums).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pick_centre_kernel(const scalar_t* __restrict__ image, const double* __restrict__ d2,
                       const double* __restrict__ chunk_sums, acc_t* __restrict__ centres,
                       int64_t B, int64_t P, int64_t K, int64_t C, int64_t j, int64_t seed) {
  const int64_t nc = kmeans_num_chunks(P);
  for (int64_t b = grid_stride_start(); b < B; b += grid_stride_step()) {
    const double u = kmeans_uniform(seed, j);
    const int64_t p =
        j == 0 ? uniform_pixel(u, P) : kmeanspp_draw(d2 + b * P, chunk_sums + b * nc, P, u);
    for (int64_t c = 0; c < C; ++c) {
      centres[(b * K + j) * C + c] = static_cast<acc_t>(image[(b * C + c) * P + p]);
    }
  }
}

// d2[b,p] = kmeanspp_d2(j == 0, d2[b,p], |x_p - centre j|^2).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    kmeanspp_d2_kernel(const scalar_t* __restrict__ image, const acc_t* __restrict__ centres,
                       double* __restrict__ d2, int64_t B, int64_t P, int64_t K, int64_t C,
                       int64_t j) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const acc_t* centre = centres + (b * K + j) * C;
    const scalar_t* x = image + b * C * P;
    for (int64_t p = grid_stride_start(); p < P; p += grid_stride_step()) {
      const double previous = j == 0 ? 0.0 : d2[b * P + p];  // unset before centre 0
      d2[b * P + p] = kmeanspp_d2(j == 0, previous, squared_distance<0, acc_t>(x + p, P, centre, C));
    }
  }
}

// chunk_sums[b, t] = ordered_sum of d2 over chunk t of image b.
__global__ void __launch_bounds__(kThreads)
    chunk_sums_kernel(const double* __restrict__ d2, double* __restrict__ chunk_sums, int64_t B,
                      int64_t P) {
  const int64_t nc = kmeans_num_chunks(P);
  for (int64_t i = grid_stride_start(); i < B * nc; i += grid_stride_step()) {
    const int64_t b = i / nc, p0 = (i % nc) * kKMeansChunk;
    chunk_sums[i] = ordered_sum(d2 + b * P + p0, P - p0 < kKMeansChunk ? P - p0 : kKMeansChunk);
  }
}

// ---------------------------------------------------------------------------
// Lloyd iterations
// ---------------------------------------------------------------------------

// index[b,p] = nearest centre. it >= 0: Lloyd iteration `it` -- skipped for an
// image whose previous assignment repeated (it >= 2 and !changed[it-1]), and
// changed[it] is set where a pixel moves (it >= 1). it < 0: final assignment.
// Dynamic shared memory: the image's K*C centres, if shared_centres.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    assign_kernel(const scalar_t* __restrict__ image, const acc_t* __restrict__ centres,
                  int64_t* __restrict__ index, int* __restrict__ changed, int64_t B, int64_t P,
                  int64_t K, int64_t C, int64_t it, bool shared_centres) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* staged = reinterpret_cast<acc_t*>(smem);
  // Loop bounds and skips depend on blockIdx only: uniform, so __syncthreads is safe.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (it >= 2 && changed[(it - 1) * B + b] == 0) continue;
    const acc_t* cb = centres + b * K * C;
    if (shared_centres) {
      for (int64_t i = threadIdx.x; i < K * C; i += blockDim.x) staged[i] = cb[i];
      __syncthreads();
      cb = staged;
    }
    const scalar_t* x = image + b * C * P;
    bool moved = false;
    for (int64_t p = grid_stride_start(); p < P; p += grid_stride_step()) {
      const int64_t k = nearest_colour<0, acc_t>(x + p, P, cb, K, C);
      moved = moved || (it >= 1 && index[b * P + p] != k);
      index[b * P + p] = k;
    }
    if (moved) changed[it * B + b] = 1;  // every writer stores the same value
    if (shared_centres) __syncthreads();  // staged is reused for the next image
  }
}

// Per (image, chunk): counts[b,t,k] and sums[b,t,k,c] over the chunk's pixels
// of colour k, each sum in pixel order from 0 (as the CPU kernel). The chunk is
// sorted by colour once (sort_tile_by_colour, stable), then a thread per
// colour adds exactly its own pixels: kKMeansChunk additions per channel in
// all, not K times as many. (A thread, not a group of lanes as in the hard
// palette's index_partial_sums_kernel: the CPU's pixel-order sum is one chain
// of additions per colour, which a bit-identical result must follow.) Skipped for an image whose assignment repeated
// (it >= 1 and !changed[it]).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    cluster_sums_kernel(const scalar_t* __restrict__ image, const int64_t* __restrict__ index,
                        const int* __restrict__ changed, acc_t* __restrict__ sums,
                        int64_t* __restrict__ counts, int64_t B, int64_t P, int64_t K,
                        int64_t C, int64_t it) {
  static_assert(kKMeansChunk == kTile, "cluster_sums_kernel: a chunk is one sorted tile");
  __shared__ TileSort sort;
  __shared__ acc_t x_tile[kChunk][kKMeansChunk];
  const int64_t nc = kmeans_num_chunks(P);
  // Loop bounds and skips depend on blockIdx only: uniform, so __syncthreads is safe.
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (it >= 1 && changed[it * B + b] == 0) continue;
    for (int64_t t = blockIdx.x; t < nc; t += gridDim.x) {
      const int64_t p0 = t * kKMeansChunk;
      const int n = static_cast<int>(min_i64(kKMeansChunk, P - p0));
      // Indices come from assign_kernel: always in [0, K).
      for (int i = threadIdx.x; i < n; i += kThreads) {
        sort.key[i] = static_cast<int16_t>(index[b * P + p0 + i]);
      }
      sort_tile_by_colour(sort, n, static_cast<int>(K));
      const int k = threadIdx.x;  // a thread per colour (K <= kThreads)
      const int begin = k < K ? sort.start[k] : 0;
      const int end = k < K ? sort.start[k + 1] : 0;
      const int64_t btk = (b * nc + t) * K + k;
      if (k < K) counts[btk] = end - begin;
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int cc = static_cast<int>(min_i64(kChunk, C - c0));
        stage_channel_tile(x_tile, image, b, C, c0, cc, P, p0, n);
        __syncthreads();
        acc_t s[kChunk];
#pragma unroll
        for (int j = 0; j < kChunk; ++j) s[j] = acc_t(0);
        for (int e = begin; e < end; ++e) {  // the colour's pixels, in pixel order
          const int i = sort.order[e];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (j < cc) s[j] = add_rn(s[j], x_tile[j][i]);
          }
        }
        if (k < K) {
          for (int j = 0; j < cc; ++j) sums[btk * C + c0 + j] = s[j];
        }
        __syncthreads();  // x_tile (and, after the last chunk, sort) are overwritten next
      }
    }
  }
}

// centres[b,k,c] = kmeans_centre(sum over chunks in order, count, previous).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    centres_kernel(const acc_t* __restrict__ sums, const int64_t* __restrict__ counts,
                   const int* __restrict__ changed, acc_t* __restrict__ centres, int64_t B,
                   int64_t P, int64_t K, int64_t C, int64_t it) {
  const int64_t nc = kmeans_num_chunks(P);
  for (int64_t bk = grid_stride_start(); bk < B * K; bk += grid_stride_step()) {
    const int64_t b = bk / K, k = bk % K;
    if (it >= 1 && changed[it * B + b] == 0) continue;
    int64_t count = 0;
    for (int64_t t = 0; t < nc; ++t) count += counts[(b * nc + t) * K + k];
    for (int64_t c = 0; c < C; ++c) {
      acc_t sum = acc_t(0);
      for (int64_t t = 0; t < nc; ++t) sum = add_rn(sum, sums[((b * nc + t) * K + k) * C + c]);
      centres[bk * C + c] = kmeans_centre(sum, count, centres[bk * C + c]);
    }
  }
}

// palette = centres rounded to scalar_t; centres = the rounded values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    round_centres_kernel(acc_t* __restrict__ centres, scalar_t* __restrict__ palette, int64_t n) {
  for (int64_t i = grid_stride_start(); i < n; i += grid_stride_step()) {
    const scalar_t v = static_cast<scalar_t>(centres[i]);
    palette[i] = v;
    centres[i] = static_cast<acc_t>(v);
  }
}

template <typename scalar_t>
void kmeans_forward(const at::Tensor& image, int64_t K, int64_t iters, int64_t seed,
                    at::Tensor& index_map, at::Tensor& palette, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t P = image.size(2) * image.size(3);
  const int64_t nc = kmeans_num_chunks(P);
  const auto opts = image.options();
  const auto acc_opts = opts.dtype(scalar_type_of<acc_t>());
  at::Tensor centres = at::empty({B * K * C}, acc_opts);
  at::Tensor d2 = at::empty({B * P}, opts.dtype(at::kDouble));
  at::Tensor chunk_sums = at::empty({B * nc}, opts.dtype(at::kDouble));
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  acc_t* cent = centres.mutable_data_ptr<acc_t>();
  double* d2_ptr = d2.mutable_data_ptr<double>();
  double* cs_ptr = chunk_sums.mutable_data_ptr<double>();
  int64_t* idx = index_map.mutable_data_ptr<int64_t>();

  const unsigned int grid_y = capped(B, kMaxGridY);
  const dim3 pixel_grid(capped(ceil_div(P, kThreads), kMaxGridX), grid_y);

  // --- k-means++ seeding.
  pick_centre_kernel<scalar_t, acc_t><<<grid_for(B), kThreads, 0, stream>>>(
      img, d2_ptr, cs_ptr, cent, B, P, K, C, 0, seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t j = 1; j < K; ++j) {
    kmeanspp_d2_kernel<scalar_t, acc_t><<<pixel_grid, kThreads, 0, stream>>>(img, cent, d2_ptr, B,
                                                                              P, K, C, j - 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk_sums_kernel<<<grid_for(B * nc), kThreads, 0, stream>>>(d2_ptr, cs_ptr, B, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_centre_kernel<scalar_t, acc_t><<<grid_for(B), kThreads, 0, stream>>>(
        img, d2_ptr, cs_ptr, cent, B, P, K, C, j, seed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // --- Lloyd iterations.
  const int64_t centre_bytes = K * C * static_cast<int64_t>(sizeof(acc_t));
  const bool shared_centres = centre_bytes <= kMaxSharedBytes;
  const size_t assign_smem = shared_centres ? static_cast<size_t>(centre_bytes) : 0;
  at::Tensor changed = at::zeros({std::max<int64_t>(iters, 1) * B}, opts.dtype(at::kInt));
  int* changed_ptr = changed.mutable_data_ptr<int>();
  if (iters > 0) {
    at::Tensor sums = at::empty({B * nc * K * C}, acc_opts);
    at::Tensor counts = at::empty({B * nc * K}, opts.dtype(at::kLong));
    acc_t* sums_ptr = sums.mutable_data_ptr<acc_t>();
    int64_t* counts_ptr = counts.mutable_data_ptr<int64_t>();
    for (int64_t it = 0; it < iters; ++it) {
      assign_kernel<scalar_t, acc_t><<<pixel_grid, kThreads, assign_smem, stream>>>(
          img, cent, idx, changed_ptr, B, P, K, C, it, shared_centres);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cluster_sums_kernel<scalar_t, acc_t>
          <<<dim3(capped(nc, kMaxGridX), grid_y), kThreads, 0, stream>>>(
              img, idx, changed_ptr, sums_ptr, counts_ptr, B, P, K, C, it);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      centres_kernel<acc_t><<<grid_for(B * K), kThreads, 0, stream>>>(
          sums_ptr, counts_ptr, changed_ptr, cent, B, P, K, C, it);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  // --- The returned palette and the final assignment against it.
  round_centres_kernel<scalar_t, acc_t><<<grid_for(B * K * C), kThreads, 0, stream>>>(
      cent, palette.mutable_data_ptr<scalar_t>(), B * K * C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  assign_kernel<scalar_t, acc_t><<<pixel_grid, kThreads, assign_smem, stream>>>(
      img, cent, idx, changed_ptr, B, P, K, C, -1, shared_centres);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> kmeans_palette_cuda(const at::Tensor& image_in,
                                                       int64_t num_colors, int64_t iters,
                                                       int64_t seed) {
  check_kmeans_args(image_in, num_colors, iters);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  at::Tensor index_map = at::empty({B, H, W}, image.options().dtype(at::kLong));
  at::Tensor palette = at::empty({B, num_colors, C}, image.options());
  if (B == 0) return {index_map, palette};
  if (H * W == 0) {  // no pixels: nothing to cluster, the palette is zeros
    palette.zero_();
    return {index_map, palette};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(),
                                  "kmeans_palette_cuda", [&] {
                                    kmeans_forward<scalar_t>(image, num_colors, iters, seed,
                                                             index_map, palette, stream);
                                  });
  return {index_map, palette};
}

}  // namespace
}  // namespace colorquant

TORCH_LIBRARY_IMPL(colorquant, CUDA, m) {
  m.impl("kmeans_palette", &colorquant::kmeans_palette_cuda);
}
