// Argument validation shared by every kernel (CPU, CUDA) of the ops, so that
// bad input gets the same clear Python exception whichever device runs:
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_INDEX -> IndexError.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <optional>

namespace colorquant {

constexpr int64_t kMaxColors = 256;

// The floating-point dtypes the kernels compute in (float8 types are floating
// point too, but have no arithmetic here).
inline bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(
      is_kernel_float(t.scalar_type()), name,
      " must be a floating-point tensor (float32, float16, bfloat16 or "
      "float64), got ",
      t.scalar_type());
}

inline void check_ndim(const at::Tensor& t, int64_t ndim, const char* name,
                       const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must be ", ndim, "-D ", layout,
                    ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name,
                              const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name,
                    " must be on the same device, got ", a.device(), " and ",
                    b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name,
                             const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), a_name, " and ",
                   b_name, " must have the same dtype, got ", a.scalar_type(),
                   " and ", b.scalar_type());
}

inline void check_num_colors(int64_t k, const char* what) {
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxColors, "the number of colours K (",
                    what, ") must be in [1, ", kMaxColors, "], got ", k);
}

// logits [B,K,H,W] and image [B,C,H,W].
inline void check_logits_image(const at::Tensor& logits,
                               const at::Tensor& image) {
  check_floating(logits, "logits");
  check_floating(image, "image");
  check_ndim(logits, 4, "logits", "[B, K, H, W]");
  check_ndim(image, 4, "image", "[B, C, H, W]");
  check_same_device(logits, "logits", image, "image");
  check_same_dtype(logits, "logits", image, "image");
  check_num_colors(logits.size(1), "logits.shape[1]");
  TORCH_CHECK_VALUE(image.size(1) >= 1,
                    "image must have at least one channel, got shape ",
                    image.sizes());
  TORCH_CHECK_VALUE(logits.size(0) == image.size(0) &&
                        logits.size(2) == image.size(2) &&
                        logits.size(3) == image.size(3),
                    "logits [B, K, H, W] and image [B, C, H, W] must agree in "
                    "B, H and W, got ",
                    logits.sizes(), " and ", image.sizes());
}

inline void check_temperature_eps(double temperature, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be a finite number > 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0,
                    "eps must be a finite number >= 0, got ", eps);
}

// index_map [B,H,W] (int64) and palette [B,K,C].
inline void check_index_palette(const at::Tensor& index_map,
                                const at::Tensor& palette) {
  TORCH_CHECK_TYPE(index_map.scalar_type() == at::kLong,
                   "index_map must be an int64 (torch.long) tensor, got ",
                   index_map.scalar_type());
  check_floating(palette, "palette");
  check_ndim(index_map, 3, "index_map", "[B, H, W]");
  check_ndim(palette, 3, "palette", "[B, K, C]");
  check_same_device(index_map, "index_map", palette, "palette");
  check_num_colors(palette.size(1), "palette.shape[1]");
  TORCH_CHECK_VALUE(palette.size(2) >= 1,
                    "palette must have at least one channel, got shape ",
                    palette.sizes());
  TORCH_CHECK_VALUE(index_map.size(0) == palette.size(0),
                    "index_map [B, H, W] and palette [B, K, C] must agree in "
                    "B, got ",
                    index_map.sizes(), " and ", palette.sizes());
}

// image [B,C,H,W] of the palette ops: floating point (an integer image must
// be converted first), C >= 1.
inline void check_image(const at::Tensor& image) {
  TORCH_CHECK_TYPE(
      is_kernel_float(image.scalar_type()),
      "image must be a floating-point tensor (float32, float16, bfloat16 or "
      "float64), got ",
      image.scalar_type(),
      "; convert it first, e.g. image.float() / 255 for 8-bit colours");
  check_ndim(image, 4, "image", "[B, C, H, W]");
  TORCH_CHECK_VALUE(image.size(1) >= 1,
                    "image must have at least one channel, got shape ",
                    image.sizes());
}

// The quantizers' rule for NaN / inf pixels (k-means, dithering; PIL's
// median cut and octree in Python): a clear error, never a palette spread
// with NaN. One pass over the image; on CUDA the answer waits for the GPU.
inline void check_finite_pixels(const at::Tensor& image) {
  if (image.numel() == 0 || image.is_meta()) return;
  TORCH_CHECK_VALUE(at::isfinite(image).all().item<bool>(),
                    "image contains NaN or infinite values: the quantizers "
                    "need finite pixels (replace them first, e.g. "
                    "torch.nan_to_num)");
}

// kmeans_palette(image, num_colors, iters, seed).
inline void check_kmeans_args(const at::Tensor& image, int64_t num_colors,
                              int64_t iters) {
  check_image(image);
  check_num_colors(num_colors, "num_colors");
  TORCH_CHECK_VALUE(iters >= 0, "iters must be >= 0, got ", iters);
  check_finite_pixels(image);
}

// floyd_steinberg_dither's optional clamp of each pixel's value (pixel plus
// the error it received) to [clamp_min, clamp_max].
inline void check_clamp(std::optional<double> clamp_min, std::optional<double> clamp_max) {
  TORCH_CHECK_VALUE(!(clamp_min && std::isnan(*clamp_min)) && !(clamp_max && std::isnan(*clamp_max)),
                    "clamp_min and clamp_max must not be NaN");
  TORCH_CHECK_VALUE(!(clamp_min && clamp_max) || *clamp_min <= *clamp_max,
                    "clamp_min must be <= clamp_max, got ", clamp_min.value_or(0), " and ",
                    clamp_max.value_or(0));
}

// image [B,C,H,W] and palette [B,K,C]: same dtype and device, same B and C.
inline void check_image_palette(const at::Tensor& image,
                                const at::Tensor& palette) {
  check_image(image);
  check_floating(palette, "palette");
  check_ndim(palette, 3, "palette", "[B, K, C]");
  check_same_device(image, "image", palette, "palette");
  check_same_dtype(image, "image", palette, "palette");
  check_num_colors(palette.size(1), "palette.shape[1]");
  TORCH_CHECK_VALUE(palette.size(0) == image.size(0) &&
                        palette.size(2) == image.size(1),
                    "palette [B, K, C] and image [B, C, H, W] must agree in B "
                    "and C, got ",
                    palette.sizes(), " and ", image.sizes());
}

// A gradient must have exactly the shape of the forward output it belongs to
// and live on the device of the forward tensors.
inline void check_grad(const at::Tensor& grad, at::IntArrayRef sizes,
                       const at::Tensor& forward, const char* name) {
  TORCH_CHECK_VALUE(grad.sizes() == sizes, name, " must have shape ", sizes,
                    ", got ", grad.sizes());
  check_same_device(grad, name, forward, "the forward tensors");
  check_floating(grad, name);
}

inline void check_grad(const at::Tensor& grad, const at::Tensor& like,
                       const char* name) {
  check_grad(grad, like.sizes(), like, name);
}

// palette_distance_backward(grad, image, palette): the forward's arguments
// (check_image_palette) and grad of the output's shape [B,K,H,W].
inline void check_palette_distance_backward(const at::Tensor& grad,
                                            const at::Tensor& image,
                                            const at::Tensor& palette) {
  check_image_palette(image, palette);
  check_grad(grad,
             {image.size(0), palette.size(1), image.size(2), image.size(3)},
             image, "grad");
}

// Arguments of soft_color_quantize_backward: the saved forward tensors
// (probs [B,K,H,W], image [B,C,H,W], palette [B,K,C]) and one gradient per
// forward output, each absent (zeros) or of the output's shape. The kernels
// index the saved palette as [B,K,C], so a wrong shape must be an error, not
// an out-of-bounds read.
inline void check_soft_backward(const std::optional<at::Tensor>& grad_quantized,
                                const std::optional<at::Tensor>& grad_palette,
                                const std::optional<at::Tensor>& grad_probs,
                                const at::Tensor& probs,
                                const at::Tensor& image,
                                const at::Tensor& palette, double temperature,
                                double eps) {
  check_logits_image(probs, image);
  check_temperature_eps(temperature, eps);
  check_floating(palette, "palette");
  check_same_device(palette, "palette", image, "image");
  TORCH_CHECK_VALUE(palette.dim() == 3 && palette.size(0) == image.size(0) &&
                        palette.size(1) == probs.size(1) &&
                        palette.size(2) == image.size(1),
                    "palette must have shape [B, K, C] = [", image.size(0),
                    ", ", probs.size(1), ", ", image.size(1), "], got ",
                    palette.sizes());
  if (grad_quantized) check_grad(*grad_quantized, image, "grad_quantized");
  if (grad_probs) check_grad(*grad_probs, probs, "grad_probs");
  if (grad_palette) check_grad(*grad_palette, palette, "grad_palette");
}

// An upstream gradient of soft_color_quantize_backward in the kernels' dtype
// and layout: given, converted (a no-op when it already is), or absent,
// materialized as zeros of like's shape when materialize_absent (the small
// ones: grad_quantized, grad_palette) and left undefined otherwise.
inline at::Tensor soft_upstream_grad(const std::optional<at::Tensor>& grad,
                                     const at::Tensor& like,
                                     at::ScalarType dtype,
                                     bool materialize_absent) {
  if (grad) return grad->to(dtype).contiguous();
  if (materialize_absent) return at::zeros(like.sizes(), like.options().dtype(dtype));
  return at::Tensor();
}

}  // namespace colorquant
