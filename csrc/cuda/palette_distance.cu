// CUDA kernels of palette_distance and its backward. The arithmetic is in
// common/palette_math.h (squared_distance, distance_grad_term; shared with the
// CPU kernels), in the same order as there, so the distances and grad_image
// equal the CPU's bit for bit; this file only adds the parallel structure:
//   forward:      thread per pixel, colours in ascending order.
//   grad_image:   thread per pixel, the colours' terms added in ascending order.
//   grad_palette: per-tile partial sums (block per (image, tile of kTile
//                 pixels), a warp per colour, lane-strided then a fixed
//                 shuffle tree, scaled by -2), then finish_sums_kernel
//                 (cuda_utils.cuh) adds the tiles in a fixed order. No atomics:
//                 deterministic run to run (not bit-equal to the CPU, which sums
//                 in chunks of lanes).
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

// out[b,k,p] = squared_distance(image[b,:,p], palette[b,k]). Thread per pixel:
// consecutive threads read and write consecutive pixels of a plane
// (coalesced); the palette entry is the same for the whole warp (a broadcast).
// kC > 0: the channel count at compile time (RGB), the pixel in registers.
template <int kC, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    distance_kernel(const scalar_t* __restrict__ image, const scalar_t* __restrict__ palette,
                    scalar_t* __restrict__ out, int64_t B, int64_t P, int64_t K, int64_t C) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t p = i - b * P;
    const scalar_t* x_px = image + b * C * P + p;
    const scalar_t* palette_b = palette + b * K * C;
    scalar_t* out_px = out + b * K * P + p;
    if constexpr (kC > 0) {
      acc_t x[kC];
#pragma unroll
      for (int c = 0; c < kC; ++c) x[c] = static_cast<acc_t>(x_px[c * P]);
      for (int64_t k = 0; k < K; ++k) {
        out_px[k * P] = static_cast<scalar_t>(squared_distance<kC, acc_t>(x, 1, palette_b + k * kC, kC));
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        out_px[k * P] = static_cast<scalar_t>(squared_distance<0, acc_t>(x_px, P, palette_b + k * C, C));
      }
    }
  }
}

// grad_image[b,c,p] = distance_image_grad(sum_k distance_grad_term(grad[b,k,p],
// image[b,c,p], palette[b,k,c])), thread per pixel, channels in register chunks
// (grad read once per chunk: once for C <= kChunk), colours in ascending order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    distance_image_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ image,
                               const scalar_t* __restrict__ palette, scalar_t* __restrict__ grad_image,
                               int64_t B, int64_t P, int64_t K, int64_t C) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t p = i - b * P;
    const scalar_t* g_px = grad + b * K * P + p;
    const scalar_t* x_px = image + b * C * P + p;
    const scalar_t* palette_b = palette + b * K * C;
    scalar_t* out_px = grad_image + b * C * P + p;
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      acc_t x[kChunk], sum[kChunk];
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        x[j] = c0 + j < C ? static_cast<acc_t>(x_px[(c0 + j) * P]) : acc_t(0);
        sum[j] = acc_t(0);
      }
      for (int64_t k = 0; k < K; ++k) {
        const acc_t g = static_cast<acc_t>(g_px[k * P]);
        const scalar_t* colour = palette_b + k * C + c0;
#pragma unroll
        for (int j = 0; j < kChunk; ++j) {
          if (c0 + j < C) {
            sum[j] = add_rn(sum[j], distance_grad_term(g, x[j], static_cast<acc_t>(colour[j])));
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        if (c0 + j < C) out_px[(c0 + j) * P] = static_cast<scalar_t>(distance_image_grad(sum[j]));
      }
    }
  }
}

// Stage 1 of grad_palette: one block per (image b, tile t of kTile pixels)
// writes, for every colour k and channel c, distance_palette_grad of the
// tile's sum_p distance_grad_term(grad[b,k,p], image[b,c,p], palette[b,k,c])
// to partial[((b*K + k)*(C+1) + 1 + c)*num_tiles + t] -- the layout of
// finish_sums_kernel (slot 0 of each colour, a weight there, is unused by
// Finish::kSum). The image tile is staged in shared memory (read by every
// colour); a warp per colour, lanes over pixels in a fixed stride, then the
// fixed shuffle tree (warp_sum): deterministic.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    distance_palette_partials_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ image,
                                     const scalar_t* __restrict__ palette,
                                     acc_t* __restrict__ partial, int64_t B, int64_t P, int64_t K,
                                     int64_t C, int64_t num_tiles) {
  __shared__ acc_t x_tile[kChunk][kTile];
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
        stage_channel_tile(x_tile, image, b, C, c0, cc, P, p0, n);
        __syncthreads();
        for (int64_t k = warp; k < K; k += kWarps) {
          const scalar_t* g_row = grad + (b * K + k) * P + p0;
          const scalar_t* colour = palette + (b * K + k) * C + c0;
          acc_t col[kChunk], sum[kChunk];
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            col[j] = j < cc ? static_cast<acc_t>(colour[j]) : acc_t(0);
            sum[j] = acc_t(0);
          }
          for (int i = lane; i < n; i += kWarpSize) {
            const acc_t g = static_cast<acc_t>(g_row[i]);
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              if (j < cc) sum[j] = add_rn(sum[j], distance_grad_term(g, x_tile[j][i], col[j]));
            }
          }
#pragma unroll
          for (int j = 0; j < kChunk; ++j) {
            if (j < cc) sum[j] = warp_sum(sum[j]);  // cc is warp-uniform
          }
          if (lane == 0) {
            acc_t* out = partial + (b * K + k) * J * num_tiles + t;
#pragma unroll
            for (int j = 0; j < kChunk; ++j) {
              if (j < cc) out[(1 + c0 + j) * num_tiles] = distance_palette_grad(sum[j]);
            }
          }
        }
        __syncthreads();  // x_tile is overwritten by the next chunk / tile
      }
    }
  }
}

}  // namespace

at::Tensor palette_distance_cuda(const at::Tensor& image_in, const at::Tensor& palette_in) {
  check_image_palette(image_in, palette_in);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const at::Tensor palette = palette_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  const int64_t K = palette.size(1);
  const int64_t P = H * W;
  at::Tensor out = at::empty({B, K, H, W}, image.options());
  if (B * P == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, image.scalar_type(), "palette_distance_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto launch = [&](auto kernel) {
          kernel<<<grid_for(B * P), kThreads, 0, stream>>>(
              image.const_data_ptr<scalar_t>(), palette.const_data_ptr<scalar_t>(),
              out.mutable_data_ptr<scalar_t>(), B, P, K, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if (C == 3) {
          launch(distance_kernel<3, scalar_t, acc_t>);
        } else {
          launch(distance_kernel<0, scalar_t, acc_t>);
        }
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor> palette_distance_backward_cuda(const at::Tensor& grad_in,
                                                                  const at::Tensor& image_in,
                                                                  const at::Tensor& palette_in) {
  check_palette_distance_backward(grad_in, image_in, palette_in);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor image = image_in.contiguous();
  const at::Tensor palette = palette_in.contiguous();
  // A gradient normally arrives in the forward's dtype (a no-op then).
  const at::Tensor grad = grad_in.to(image.scalar_type()).contiguous();
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t P = image.size(2) * image.size(3);
  const int64_t K = palette.size(1);
  at::Tensor grad_image = at::empty(image.sizes(), image.options());
  at::Tensor grad_palette = at::empty(palette.sizes(), palette.options());
  if (B == 0) return {grad_image, grad_palette};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, image.scalar_type(), "palette_distance_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* g = grad.const_data_ptr<scalar_t>();
        const scalar_t* x = image.const_data_ptr<scalar_t>();
        const scalar_t* pal = palette.const_data_ptr<scalar_t>();
        if (P > 0) {
          distance_image_grad_kernel<scalar_t, acc_t><<<grid_for(B * P), kThreads, 0, stream>>>(
              g, x, pal, grad_image.mutable_data_ptr<scalar_t>(), B, P, K, C);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        const int64_t num_tiles = ceil_div(P, kTile);
        // Freed when this returns: the caching allocator is stream-ordered.
        const at::Tensor partial =
            at::empty({B * K * (C + 1) * num_tiles}, image.options().dtype(scalar_type_of<acc_t>()));
        acc_t* partial_ptr = partial.mutable_data_ptr<acc_t>();
        if (num_tiles > 0) {
          const dim3 grid(capped(num_tiles, kMaxGridX), capped(B, kMaxGridY));
          distance_palette_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
              g, x, pal, partial_ptr, B, P, K, C, num_tiles);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // The tiles' partials added in a fixed order; P == 0: zeros (empty sums).
        const int64_t num_out = B * K * C;
        scalar_t* out = grad_palette.mutable_data_ptr<scalar_t>();
        if (num_tiles >= kWarpFinishTiles) {
          finish_sums_kernel<Finish::kSum, kWarpSize, scalar_t, acc_t>
              <<<grid_for(num_out * kWarpSize), kThreads, 0, stream>>>(
                  partial_ptr, B, K, C, num_tiles, static_cast<const scalar_t*>(nullptr), acc_t(0), out,
                  static_cast<acc_t*>(nullptr));
        } else {
          finish_sums_kernel<Finish::kSum, 1, scalar_t, acc_t>
              <<<grid_for(num_out), kThreads, 0, stream>>>(
                  partial_ptr, B, K, C, num_tiles, static_cast<const scalar_t*>(nullptr), acc_t(0), out,
                  static_cast<acc_t*>(nullptr));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_image, grad_palette};
}

}  // namespace colorquant

TORCH_LIBRARY_IMPL(colorquant, CUDA, m) {
  m.impl("palette_distance", &colorquant::palette_distance_cuda);
  m.impl("palette_distance_backward", &colorquant::palette_distance_backward_cuda);
}
