"""The kernels' argument checks (``csrc/common/checks.h``) for the fake (meta) implementations.

A call that the CPU or CUDA kernel rejects must fail the same way on meta tensors and under
``torch.compile`` (fake tensors), where no kernel runs: same exception type, same message. These
functions restate the C++ checks one for one (names match); ``colorquant_ops_tests/test_errors.py``
runs every bad-argument case on the ``meta`` device too, so the two cannot drift apart.
Data-dependent checks (index ranges, NaN pixels) need the values and stay with the kernels.
"""

import math

import torch

MAX_COLORS = 256

_KERNEL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# c10's ScalarType names, which the C++ messages print.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
    torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2",
}


def _dtype(t) -> str:
    return _SCALAR_TYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))


def _sizes(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_floating(t, name: str) -> None:
    if t.dtype not in _KERNEL_FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {_dtype(t)}")


def check_ndim(t, ndim: int, name: str, layout: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {_sizes(t)}")


def check_same_device(a, a_name: str, b, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}")


def check_same_dtype(a, a_name: str, b, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {_dtype(a)} and {_dtype(b)}")


def check_num_colors(k, what: str) -> None:
    if not 1 <= k <= MAX_COLORS:
        raise ValueError(f"the number of colours K ({what}) must be in [1, {MAX_COLORS}], got {k}")


def check_logits_image(logits, image) -> None:
    check_floating(logits, "logits")
    check_floating(image, "image")
    check_ndim(logits, 4, "logits", "[B, K, H, W]")
    check_ndim(image, 4, "image", "[B, C, H, W]")
    check_same_device(logits, "logits", image, "image")
    check_same_dtype(logits, "logits", image, "image")
    check_num_colors(logits.shape[1], "logits.shape[1]")
    if image.shape[1] < 1:
        raise ValueError(f"image must have at least one channel, got shape {_sizes(image)}")
    if not (logits.shape[0] == image.shape[0] and logits.shape[2] == image.shape[2]
            and logits.shape[3] == image.shape[3]):
        raise ValueError(f"logits [B, K, H, W] and image [B, C, H, W] must agree in B, H and W, got "
                         f"{_sizes(logits)} and {_sizes(image)}")


def check_temperature_eps(temperature: float, eps: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature:g}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps:g}")


def check_index_palette(index_map, palette) -> None:
    if index_map.dtype != torch.int64:
        raise TypeError(f"index_map must be an int64 (torch.long) tensor, got {_dtype(index_map)}")
    check_floating(palette, "palette")
    check_ndim(index_map, 3, "index_map", "[B, H, W]")
    check_ndim(palette, 3, "palette", "[B, K, C]")
    check_same_device(index_map, "index_map", palette, "palette")
    check_num_colors(palette.shape[1], "palette.shape[1]")
    if palette.shape[2] < 1:
        raise ValueError(f"palette must have at least one channel, got shape {_sizes(palette)}")
    if index_map.shape[0] != palette.shape[0]:
        raise ValueError(f"index_map [B, H, W] and palette [B, K, C] must agree in B, got {_sizes(index_map)} "
                         f"and {_sizes(palette)}")


def check_image(image) -> None:
    if image.dtype not in _KERNEL_FLOATS:
        raise TypeError("image must be a floating-point tensor (float32, float16, bfloat16 or float64), got "
                        f"{_dtype(image)}; convert it first, e.g. image.float() / 255 for 8-bit colours")
    check_ndim(image, 4, "image", "[B, C, H, W]")
    if image.shape[1] < 1:
        raise ValueError(f"image must have at least one channel, got shape {_sizes(image)}")


def check_kmeans_args(image, num_colors: int, iters: int) -> None:
    check_image(image)
    check_num_colors(num_colors, "num_colors")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")


def check_clamp(clamp_min, clamp_max) -> None:
    if (clamp_min is not None and math.isnan(clamp_min)) or (clamp_max is not None and math.isnan(clamp_max)):
        raise ValueError("clamp_min and clamp_max must not be NaN")
    if clamp_min is not None and clamp_max is not None and clamp_min > clamp_max:
        raise ValueError(f"clamp_min must be <= clamp_max, got {clamp_min:g} and {clamp_max:g}")


def check_image_palette(image, palette) -> None:
    check_image(image)
    check_floating(palette, "palette")
    check_ndim(palette, 3, "palette", "[B, K, C]")
    check_same_device(image, "image", palette, "palette")
    check_same_dtype(image, "image", palette, "palette")
    check_num_colors(palette.shape[1], "palette.shape[1]")
    if not (palette.shape[0] == image.shape[0] and palette.shape[2] == image.shape[1]):
        raise ValueError(f"palette [B, K, C] and image [B, C, H, W] must agree in B and C, got {_sizes(palette)} "
                         f"and {_sizes(image)}")


def check_grad(grad, sizes, forward, name: str) -> None:
    if tuple(grad.shape) != tuple(sizes):
        raise ValueError(f"{name} must have shape [{', '.join(str(s) for s in sizes)}], got {_sizes(grad)}")
    check_same_device(grad, name, forward, "the forward tensors")
    check_floating(grad, name)


def check_palette_distance_backward(grad, image, palette) -> None:
    check_image_palette(image, palette)
    check_grad(grad, (image.shape[0], palette.shape[1], image.shape[2], image.shape[3]), image, "grad")


def check_soft_backward(grad_quantized, grad_palette, grad_probs, probs, image, palette, temperature, eps) -> None:
    check_logits_image(probs, image)
    check_temperature_eps(temperature, eps)
    check_floating(palette, "palette")
    check_same_device(palette, "palette", image, "image")
    expected = (image.shape[0], probs.shape[1], image.shape[1])
    if palette.dim() != 3 or tuple(palette.shape) != expected:
        raise ValueError(f"palette must have shape [B, K, C] = [{expected[0]}, {expected[1]}, {expected[2]}], "
                         f"got {_sizes(palette)}")
    if grad_quantized is not None:
        check_grad(grad_quantized, image.shape, image, "grad_quantized")
    if grad_probs is not None:
        check_grad(grad_probs, probs.shape, probs, "grad_probs")
    if grad_palette is not None:
        check_grad(grad_palette, palette.shape, palette, "grad_palette")


def check_render_backward(grad_image, index_map, palette) -> None:
    check_index_palette(index_map, palette)
    B, H, W = index_map.shape
    check_grad(grad_image, (B, palette.shape[2], H, W), palette, "grad_image")
