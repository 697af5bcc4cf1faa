// Schemas of the colorquant ops, declared once. Kernels are registered per
// dispatch key beside their implementations (cpu/, cuda/); autograd and fake
// (meta) implementations are registered from Python (colorquant_ops/ops).
// The upstream gradients of soft_color_quantize_backward are optional: None
// stands for zeros (an unused output), so that autograd need not materialize
// a zero [B, K, H, W] tensor for grad_probs.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing colorquant_ops._C loads this library and runs the static
// registrations below; the module itself has no attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(colorquant, m) {
  m.def(
      "soft_color_quantize(Tensor logits, Tensor image, float temperature=1.0, "
      "float eps=1e-8) -> (Tensor quantized, Tensor palette, Tensor probs)");
  m.def(
      "soft_color_quantize_backward(Tensor? grad_quantized, Tensor? grad_palette, "
      "Tensor? grad_probs, Tensor probs, Tensor image, Tensor palette, "
      "float temperature, float eps) -> (Tensor grad_logits, Tensor grad_image)");
  m.def(
      "hard_color_quantize(Tensor logits, Tensor image) -> "
      "(Tensor quantized, Tensor index_map, Tensor palette)");
  // check_indices: raise IndexError for an index outside [0, K). On CUDA this
  // costs a host sync, so the wrappers pass false for index maps known to be
  // valid, and it is skipped under CUDA graph capture (hard_color_quantize.cu).
  m.def(
      "render_index_map(Tensor index_map, Tensor palette, bool check_indices=True) "
      "-> Tensor");
  m.def(
      "render_index_map_backward(Tensor grad_image, Tensor index_map, "
      "Tensor palette, bool check_indices=True) -> Tensor");
  m.def(
      "kmeans_palette(Tensor image, int num_colors, int iters=10, int seed=0) "
      "-> (Tensor index_map, Tensor palette)");
  // clamp_min / clamp_max: clamp each pixel's value (pixel + received error)
  // before the nearest-colour search, as the seed paper's code does ([0, 255]).
  m.def(
      "floyd_steinberg_dither(Tensor image, Tensor palette, float? clamp_min=None, "
      "float? clamp_max=None) -> Tensor");
  // Squared Euclidean distance of every pixel to every palette colour:
  // out[b,k,h,w] = sum_c (image[b,c,h,w] - palette[b,k,c])^2.
  m.def("palette_distance(Tensor image, Tensor palette) -> Tensor");
  m.def(
      "palette_distance_backward(Tensor grad, Tensor image, Tensor palette) "
      "-> (Tensor grad_image, Tensor grad_palette)");
}
