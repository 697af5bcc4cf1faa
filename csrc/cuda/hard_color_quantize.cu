// CUDA kernels of hard_color_quantize, render_index_map and its backward.
// The arithmetic is in common/color_math.h (shared with the CPU kernels).
//   hard_color_quantize: argmax (thread per pixel) -> per-colour counts and
//     sums (two deterministic stages, cuda_utils.cuh) -> palette -> render.
//   render_index_map: gather, thread per pixel.
//   render_index_map_backward: the same per-colour sums as the hard palette,
//     over grad_image.
// Index-range checks need a host sync on CUDA: render_index_map and its
// backward do one only when asked (check_indices) and never under graph
// capture (check_index_range).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/color_math.h"
#include "cuda/cuda_utils.cuh"

namespace colorquant {
namespace {

using namespace cuda_detail;

// index[b,p] = argmax_k logits[b,k,p] in torch.argmax order (argmax_prefers).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const scalar_t* __restrict__ logits,
                  int64_t* __restrict__ index, int64_t B, int64_t P,
                  int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;  // exact widening, cheaper compares
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const scalar_t* z_px = logits + b * K * P + (i - b * P);
    acc_t best = static_cast<acc_t>(z_px[0]);
    int64_t best_k = 0;
    for (int64_t k = 1; k < K; ++k) {
      const acc_t z = static_cast<acc_t>(z_px[k * P]);
      if (argmax_prefers(z, best)) {
        best = z;
        best_k = k;
      }
    }
    index[i] = best_k;
  }
}

// out[b,c,p] = palette[b, index[b,p], c], thread per pixel. A copy of the
// palette entry, so hard_color_quantize's quantized equals
// render_index_map(index_map, palette) bit for bit. Out-of-range indices
// (rejected on the host before launch when checked, check_index_range) give
// zeros, never an out-of-bounds read.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    render_kernel(const int64_t* __restrict__ index,
                  const scalar_t* __restrict__ palette,
                  scalar_t* __restrict__ out, int64_t B, int64_t P, int64_t K,
                  int64_t C) {
  for (int64_t i = grid_stride_start(); i < B * P; i += grid_stride_step()) {
    const int64_t b = i / P;
    const int64_t k = index[i];
    const bool valid = k >= 0 && k < K;
    const scalar_t* entry = palette + (b * K + (valid ? k : 0)) * C;
    scalar_t* out_px = out + b * C * P + (i - b * P);
    for (int64_t c = 0; c < C; ++c) {
      out_px[c * P] = valid ? entry[c] : static_cast<scalar_t>(0);
    }
  }
}

template <typename scalar_t>
void launch_render(const at::Tensor& index_map, const at::Tensor& palette,
                   at::Tensor& out, int64_t B, int64_t P, int64_t K,
                   int64_t C, cudaStream_t stream) {
  if (B * P == 0) return;
  render_kernel<scalar_t><<<grid_for(B * P), kThreads, 0, stream>>>(
      index_map.const_data_ptr<int64_t>(), palette.const_data_ptr<scalar_t>(),
      out.mutable_data_ptr<scalar_t>(), B, P, K, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// IndexError for any index outside [0, K), when asked (check_indices): one
// device-to-host copy of min and max, which waits for the stream. It is skipped
// -- no host sync -- when check_indices is false (the Python wrapper passes
// false for index maps the library produced and nobody modified since, and
// the autograd backward always, see colorquant_ops/ops/color_quantize.py) and
// under CUDA graph capture, where a sync cannot be captured. Unchecked, an
// index outside [0, K) is no colour: the kernels render it as zeros and give
// it no gradient, and never read out of bounds (they guard every index, which
// also covers a race with a concurrent writer of index_map).
void check_index_range(const at::Tensor& index_map, int64_t K, bool check_indices) {
  if (!check_indices || index_map.numel() == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return;
  }
  const auto min_max = at::aminmax(index_map);
  const at::Tensor both =
      at::stack({std::get<0>(min_max), std::get<1>(min_max)}).cpu();
  const int64_t lo = both.const_data_ptr<int64_t>()[0];
  const int64_t hi = both.const_data_ptr<int64_t>()[1];
  // Same message as the CPU kernels (cpu/tiling.h, check_indices).
  TORCH_CHECK_INDEX(lo >= 0 && hi < K, "index_map holds the colour index ",
                    lo < 0 ? lo : hi, ", outside the palette's range [0, ", K,
                    ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hard_color_quantize_cuda(
    const at::Tensor& logits_in, const at::Tensor& image_in) {
  check_logits_image(logits_in, image_in);
  const c10::cuda::CUDAGuard device_guard(image_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor image = image_in.contiguous();
  const int64_t B = image.size(0), C = image.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  const int64_t K = logits.size(1);
  const int64_t P = H * W;

  at::Tensor quantized = at::empty({B, C, H, W}, image.options());
  at::Tensor index_map = at::empty({B, H, W}, logits.options().dtype(at::kLong));
  at::Tensor palette = at::empty({B, K, C}, image.options());
  if (B == 0) return {quantized, index_map, palette};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, image.scalar_type(), "hard_color_quantize_cuda",
      [&] {
        if (P > 0) {
          argmax_kernel<scalar_t><<<grid_for(B * P), kThreads, 0, stream>>>(
              logits.const_data_ptr<scalar_t>(),
              index_map.mutable_data_ptr<int64_t>(), B, P, K);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // With P == 0 every colour is unused: mean_or_zero gives zeros.
        colour_sums<Finish::kMeanOrZero, scalar_t>(
            IndexWeights{index_map.const_data_ptr<int64_t>()},
            image.const_data_ptr<scalar_t>(), B, P, K, C, /*extra=*/nullptr,
            /*eps=*/0.0, palette.mutable_data_ptr<scalar_t>(),
            /*out_acc=*/nullptr, image.options(), stream);
        // Gathered from the palette as written (output dtype): identical to
        // render_index_map(index_map, palette). Indices come from argmax, so
        // no range check is needed.
        launch_render<scalar_t>(index_map, palette, quantized, B, P, K, C,
                                stream);
      });
  return {quantized, index_map, palette};
}

at::Tensor render_index_map_cuda(const at::Tensor& index_map_in,
                                 const at::Tensor& palette_in, bool check_indices) {
  check_index_palette(index_map_in, palette_in);
  const c10::cuda::CUDAGuard device_guard(palette_in.device());
  const at::Tensor index_map = index_map_in.contiguous();
  const at::Tensor palette = palette_in.contiguous();
  const int64_t B = index_map.size(0);
  const int64_t H = index_map.size(1), W = index_map.size(2);
  const int64_t K = palette.size(1), C = palette.size(2);
  const int64_t P = H * W;
  check_index_range(index_map, K, check_indices);

  at::Tensor out = at::empty({B, C, H, W}, palette.options());
  if (B * P == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, palette.scalar_type(), "render_index_map_cuda",
      [&] {
        launch_render<scalar_t>(index_map, palette, out, B, P, K, C, stream);
      });
  return out;
}

at::Tensor render_index_map_backward_cuda(const at::Tensor& grad_image_in,
                                          const at::Tensor& index_map_in,
                                          const at::Tensor& palette_in,
                                          bool check_indices) {
  check_index_palette(index_map_in, palette_in);
  const int64_t B = index_map_in.size(0);
  const int64_t H = index_map_in.size(1), W = index_map_in.size(2);
  const int64_t K = palette_in.size(1), C = palette_in.size(2);
  const int64_t P = H * W;
  check_grad(grad_image_in, {B, C, H, W}, palette_in, "grad_image");

  const c10::cuda::CUDAGuard device_guard(palette_in.device());
  const at::Tensor index_map = index_map_in.contiguous();
  // Same range check as the forward (when asked): an index outside [0, K)
  // has no palette entry to receive its gradient.
  check_index_range(index_map, K, check_indices);
  const at::Tensor grad_image =
      grad_image_in.to(palette_in.scalar_type()).contiguous();

  at::Tensor grad_palette = at::empty({B, K, C}, palette_in.options());
  if (B == 0) return grad_palette;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, palette_in.scalar_type(),
      "render_index_map_backward_cuda", [&] {
        // With P == 0 this writes zeros (empty sums).
        colour_sums<Finish::kSum, scalar_t>(
            IndexWeights{index_map.const_data_ptr<int64_t>()},
            grad_image.const_data_ptr<scalar_t>(), B, P, K, C,
            /*extra=*/nullptr, /*eps=*/0.0,
            grad_palette.mutable_data_ptr<scalar_t>(), /*out_acc=*/nullptr,
            palette_in.options(), stream);
      });
  return grad_palette;
}

}  // namespace colorquant

TORCH_LIBRARY_IMPL(colorquant, CUDA, m) {
  m.impl("hard_color_quantize", &colorquant::hard_color_quantize_cuda);
  m.impl("render_index_map", &colorquant::render_index_map_cuda);
  m.impl("render_index_map_backward",
         &colorquant::render_index_map_backward_cuda);
}
