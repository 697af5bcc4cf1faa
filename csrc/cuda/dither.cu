// CUDA kernel of colorquant::floyd_steinberg_dither: error diffusion as a
// wavefront, one block per image (grid-stride over the batch), the per-pixel
// step (floyd_steinberg_pixel, common/palette_math.h) shared with the CPU
// kernel, so both give the indices of the raster-order loop.
//
// Schedule: a pass covers R = blockDim.x consecutive rows, thread i owns row
// r0 + i and handles column x = t - 2i at time step t, with a __syncthreads
// between steps. Pixel (x, y) needs the finished errors of (x-1..x+1, y-1):
// row y-1 handled column x+1 at step t-1, so the usual lag of 2 suffices, and
// the steps are lock-step, so nothing can deadlock. Within a step the rows
// touch disjoint cells (below). The 7/16 error to the right stays in the
// thread (carry). Steps per pass: W + 2 (rows - 1).
//
// Partial values (pixel + errors received from the row above) in opmath:
// * inside a pass, row i+1 reads what row i writes two columns later, so each
//   row needs only a ring of kRing = 8 cells: at step t row i writes cells
//   x-1, x, x+1 of ring i+1 while row i+1 reads cell x-2 (distinct mod 8),
//   and a cell is read (step x+2i+2) before it is reused (step x+7+2i);
// * between passes the last row of a pass writes a full-width handoff row
//   that the first row of the next pass reads (two handoff rows, alternating,
//   so a pass never writes the row it reads). Images of at most R rows are a
//   single pass: they get no handoff rows (the last row has no row below).
// Scratch per block: R rings + 2 handoff rows if H > R (+ the palette when it
// does not fit in shared memory, + carry/value per thread for a channel count
// without a register-resident specialization), in a global tensor. The grid
// has as many blocks as can be resident at once (the occupancy calculator's
// answer, at most B), which also bounds the scratch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#include "common/checks.h"
#include "common/palette_math.h"
#include "cuda/cuda_utils.cuh"

namespace colorquant {
namespace {

using namespace cuda_detail;

constexpr int kMaxRows = 1024;  // threads (= rows) per block
constexpr int64_t kRing = 8;    // cells per row ring, a power of two >= 4
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// Scratch layout of one block, in acc_t elements.
struct DitherScratch {
  int64_t ring;     // [R][kRing][C]
  int64_t handoff;  // [2][W][C] if H > R (several passes), else 0
  int64_t palette;  // [K][C], if not in shared memory
  int64_t state;    // [R][2][C] (carry, value), generic channel count only
  __host__ __device__ int64_t total() const { return ring + handoff + palette + state; }
};

inline DitherScratch dither_scratch(int64_t R, int64_t H, int64_t W, int64_t K, int64_t C,
                                    bool shared_palette, bool registers) {
  return {R * kRing * C, H > R ? 2 * W * C : 0, shared_palette ? 0 : K * C,
          registers ? 0 : 2 * R * C};
}

// kC > 0: C == kC, carry and value in registers; kC == 0: any C, in scratch.
template <typename scalar_t, typename acc_t, int kC>
__global__ void __launch_bounds__(kMaxRows)
    floyd_steinberg_kernel(const scalar_t* __restrict__ image,
                           const scalar_t* __restrict__ palette, int64_t* __restrict__ index,
                           acc_t* __restrict__ scratch, DitherScratch layout, int64_t B,
                           int64_t C, int64_t H, int64_t W, int64_t K, bool shared_palette,
                           ValueRange<acc_t> range) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t n = kC > 0 ? kC : C;
  const int64_t P = H * W;
  const int64_t R = blockDim.x;
  const int64_t tid = threadIdx.x;
  acc_t* ring = scratch + blockIdx.x * layout.total();
  acc_t* handoff = ring + layout.ring;
  acc_t* pal = shared_palette ? reinterpret_cast<acc_t*>(smem) : handoff + layout.handoff;
  acc_t local[kC > 0 ? 2 * kC : 1];
  acc_t* carry;
  acc_t* value;
  if constexpr (kC > 0) {
    carry = local;
    value = local + kC;
  } else {
    carry = handoff + layout.handoff + layout.palette + tid * 2 * n;
    value = carry + n;
  }
  constexpr int64_t kRingMask = kRing - 1;
  constexpr int64_t kFullMask = ~int64_t{0};

  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {  // uniform per block
    for (int64_t i = tid; i < K * n; i += R) pal[i] = static_cast<acc_t>(palette[b * K * n + i]);
    __syncthreads();
    const scalar_t* x = image + b * n * P;
    int64_t* out = index + b * P;
    for (int64_t r0 = 0, pass = 0; r0 < H; r0 += R, ++pass) {
      const int64_t rows = min_i64(R, H - r0);
      const int64_t y = r0 + tid;
      const bool has_below = y + 1 < H;
      // This row's partial values: the previous pass's handoff row for the
      // first row of a pass (pixels for row 0: written on the fly), else the
      // ring the thread above writes.
      const bool cur_full = tid == 0 && r0 > 0;
      acc_t* cur = cur_full ? handoff + (pass % 2) * W * n : ring + tid * kRing * n;
      const int64_t cur_mask = cur_full ? kFullMask : kRingMask;
      // The row below's: the next handoff row for the last row of the pass
      // (only dereferenced if that row has a row below, i.e. H > R).
      const bool below_full = tid == rows - 1;
      acc_t* nxt = below_full ? handoff + ((pass + 1) % 2) * W * n : ring + (tid + 1) * kRing * n;
      const int64_t nxt_mask = below_full ? kFullMask : kRingMask;

      const int64_t steps = W + 2 * (rows - 1);
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t w = t - 2 * tid;
        if (tid < rows && w >= 0 && w < W) {
          acc_t* cell = cur + (w & cur_mask) * n;
          if (y == 0) {  // row 0 has received no error
            for (int64_t c = 0; c < n; ++c) cell[c] = static_cast<acc_t>(x[c * P + w]);
          }
          out[y * W + w] = floyd_steinberg_pixel<kC, acc_t>(
              cell, carry, w == 0, value, pal, K, n,
              has_below && w > 0 ? nxt + ((w - 1) & nxt_mask) * n : nullptr,
              has_below ? nxt + (w & nxt_mask) * n : nullptr,
              has_below && w + 1 < W ? nxt + ((w + 1) & nxt_mask) * n : nullptr,
              has_below ? x + (y + 1) * W + w : nullptr, P, range);
        }
        __syncthreads();  // step t is complete (global and shared memory)
      }
    }
  }
}

template <typename scalar_t, int kC>
void launch_dither(const at::Tensor& image, const at::Tensor& palette, at::Tensor& index_map,
                   ValueRange<at::opmath_type<scalar_t>> range,
                   cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t K = palette.size(1);
  const int64_t R = std::min<int64_t>(kMaxRows, ceil_div(H, kWarpSize) * kWarpSize);
  const int64_t palette_bytes = K * C * static_cast<int64_t>(sizeof(acc_t));
  const bool shared_palette = palette_bytes <= kMaxSharedBytes;
  const DitherScratch layout = dither_scratch(R, H, W, K, C, shared_palette, kC > 0);

  // One block per image, at most as many as can be resident at once (the
  // occupancy of this kernel at R threads and this much dynamic shared
  // memory, times the SMs): more would only wait, and each holds scratch.
  const size_t smem = shared_palette ? static_cast<size_t>(palette_bytes) : 0;
  int device = 0, sms = 1, per_sm = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, floyd_steinberg_kernel<scalar_t, acc_t, kC>, static_cast<int>(R), smem));
  const int64_t blocks =
      std::min<int64_t>(B, std::max<int64_t>(1, static_cast<int64_t>(sms) * per_sm));
  const at::Tensor scratch =
      at::empty({blocks * layout.total()}, image.options().dtype(scalar_type_of<acc_t>()));
  floyd_steinberg_kernel<scalar_t, acc_t, kC>
      <<<static_cast<unsigned int>(blocks), static_cast<unsigned int>(R),
         smem, stream>>>(
          image.const_data_ptr<scalar_t>(), palette.const_data_ptr<scalar_t>(),
          index_map.mutable_data_ptr<int64_t>(), scratch.mutable_data_ptr<acc_t>(), layout, B, C,
          H, W, K, shared_palette, range);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor floyd_steinberg_dither_cuda(const at::Tensor& image_in, const at::Tensor& palette_in,
                                       std::optional<double> clamp_min,
                                       std::optional<double> clamp_max) {
  check_image_palette(image_in, palette_in);
  check_clamp(clamp_min, clamp_max);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  check_finite_pixels(image_in);
  const at::Tensor image = image_in.contiguous();
  const at::Tensor palette = palette_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  at::Tensor index_map = at::empty({B, H, W}, image.options().dtype(at::kLong));
  if (B == 0 || H * W == 0) return index_map;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, image.scalar_type(), "floyd_steinberg_dither_cuda", [&] {
        const auto range = value_range<at::opmath_type<scalar_t>>(clamp_min, clamp_max);
        switch (C) {
          case 1: launch_dither<scalar_t, 1>(image, palette, index_map, range, stream); break;
          case 3: launch_dither<scalar_t, 3>(image, palette, index_map, range, stream); break;
          case 4: launch_dither<scalar_t, 4>(image, palette, index_map, range, stream); break;
          default: launch_dither<scalar_t, 0>(image, palette, index_map, range, stream); break;
        }
      });
  return index_map;
}

}  // namespace
}  // namespace colorquant

TORCH_LIBRARY_IMPL(colorquant, CUDA, m) {
  m.impl("floyd_steinberg_dither", &colorquant::floyd_steinberg_dither_cuda);
}
