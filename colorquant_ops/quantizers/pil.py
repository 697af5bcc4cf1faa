"""Traditional colour quantizers backed by PIL (the seed paper's baselines).

Hou et al. (CVPR 2020) compare ColorCNN with PIL's ``Image.quantize``: median
cut, (fast) octree and median cut refined by k-means, each with or without
Floyd-Steinberg dithering. :func:`pil_quantize` runs them on a batch of RGB
images and returns the library's ``(index_map [B,H,W] int64, palette [B,K,C])``
pair, so that ``colorquant_ops.ops.render_index_map(index_map, palette)`` is the
quantized image.

Notes on PIL (checked against Pillow 13's source):

* ``Image.quantize(colors, method, kmeans)``: ``kmeans`` is not an iteration
  count but a convergence threshold; k-means refinement (median cut only) runs
  until at most ``kmeans - 1`` pixels change cluster in an iteration.
  ``kmeans=2`` (the paper's setting) thus iterates until at most one pixel moves.
* ``Image.quantize`` ignores its ``dither`` argument unless a ``palette`` image
  is given: PIL's quantizers themselves never dither. Dithering here is
  therefore two passes: build the palette with the chosen method, then map the
  image onto it with ``Image.quantize(palette=..., dither=FLOYDSTEINBERG)``.
* PIL may return fewer than ``K`` colours (an image with fewer distinct colours,
  or k-means emptying a cluster). The palette is padded with zero rows to
  exactly ``K``; the index map only refers to PIL's colours.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["METHODS", "pil_quantize", "pil_quantize_image"]

#: The supported method names (see :func:`pil_quantize`).
METHODS = ("median_cut", "octree", "kmeans")

# method name -> (PIL quantize method, PIL kmeans threshold)
_PIL_METHODS = {
    "median_cut": (Image.Quantize.MEDIANCUT, 0),
    "octree": (Image.Quantize.FASTOCTREE, 0),
    "kmeans": (Image.Quantize.MEDIANCUT, 2),
}


def _check_num_colors(num_colors):
    if isinstance(num_colors, bool) or not isinstance(num_colors, (int, np.integer)):
        raise TypeError(f"num_colors must be an int, got {type(num_colors).__name__}")
    num_colors = int(num_colors)
    if not 1 <= num_colors <= 256:
        raise ValueError(f"num_colors must be in [1, 256] (PIL palettes hold at most 256 colours), got {num_colors}")
    return num_colors


def _check_method(method):
    if method not in _PIL_METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return _PIL_METHODS[method]


def _quantize_rgb(rgb: np.ndarray, num_colors: int, method: str, dither: bool):
    """Quantize one ``[H,W,3]`` uint8 array; returns ``(index_map [H,W] int64, palette [K,3] uint8)``."""
    pil_method, kmeans = _check_method(method)
    image = Image.fromarray(np.ascontiguousarray(rgb))  # mode "RGB"
    quantized = image.quantize(colors=num_colors, method=pil_method, kmeans=kmeans)
    if dither:
        # PIL's quantizers never dither: map the image onto their palette with
        # Floyd-Steinberg error diffusion (PIL's "palette" path).
        quantized = image.quantize(palette=quantized, dither=Image.Dither.FLOYDSTEINBERG)
    colors = np.asarray(quantized.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    index_map = np.asarray(quantized, dtype=np.int64)
    n = colors.shape[0]
    if n > num_colors or (index_map.size and int(index_map.max()) >= n):
        raise RuntimeError(
            f"PIL returned an inconsistent palette ({n} colours for num_colors={num_colors}, "
            f"largest index {int(index_map.max()) if index_map.size else -1})"
        )
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    palette[:n] = colors
    return index_map, palette


def pil_quantize(images: Tensor, num_colors: int, method: str = "median_cut", dither: bool = False):
    """Quantize a batch of RGB images with PIL's ``Image.quantize``.

    Args:
        images: ``[B,3,H,W]`` tensor, uint8 or floating point in ``[0, 1]``.
            Float images are quantized through their uint8 rendering
            ``round(clamp(x, 0, 1) * 255)``.
        num_colors: palette size ``K`` in ``[1, 256]``.
        method: ``"median_cut"`` (``Quantize.MEDIANCUT``), ``"octree"``
            (``Quantize.FASTOCTREE``) or ``"kmeans"`` (``MEDIANCUT`` refined by
            PIL's k-means with ``kmeans=2``, as in the paper's code).
        dither: map the image onto the method's palette with Floyd-Steinberg
            error diffusion (``Dither.FLOYDSTEINBERG``) instead of nearest colour.

    Returns:
        ``(index_map, palette)``: ``index_map`` int64 ``[B,H,W]`` with values in
        ``[0, K)``; ``palette`` ``[B,K,3]``, uint8 for uint8 input, else the
        input's dtype (colours ``/ 255``). Rows PIL did not fill are zeros, so an
        image may use fewer than ``K`` colours but never more. Both are on the
        input's device (the work is done on the CPU).
    """
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a torch.Tensor, got {type(images).__name__} (use pil_quantize_image for a PIL image)"
        )
    if images.dim() != 4:
        raise ValueError(f"images must be a 4-D [B,3,H,W] tensor, got {images.dim()}-D shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} channels")
    num_colors = _check_num_colors(num_colors)
    _check_method(method)
    if images.dtype == torch.uint8:
        as_uint8 = images.detach()
    elif images.is_floating_point():
        x = images.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images contain NaN or infinite values")
        as_uint8 = (x.double().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")

    B, _, H, W = images.shape
    hwc = as_uint8.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # [B,H,W,3]
    index_map = np.zeros((B, H, W), dtype=np.int64)
    palette = np.zeros((B, num_colors, 3), dtype=np.uint8)
    if H > 0 and W > 0:
        for b in range(B):
            index_map[b], palette[b] = _quantize_rgb(hwc[b], num_colors, method, dither)

    index_map_t = torch.from_numpy(index_map).to(images.device)
    palette_t = torch.from_numpy(palette)
    if images.dtype != torch.uint8:
        palette_t = (palette_t.to(torch.float64) / 255).to(images.dtype)
    return index_map_t, palette_t.to(images.device)


def pil_quantize_image(image: Image.Image, num_colors: int, method: str = "median_cut", dither: bool = False):
    """:func:`pil_quantize` for a single PIL image (converted to RGB first).

    Returns ``(index_map [H,W] int64, palette [K,3] uint8)`` tensors.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    num_colors = _check_num_colors(num_colors)
    _check_method(method)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if rgb.size == 0:
        return torch.zeros(rgb.shape[:2], dtype=torch.int64), torch.zeros(num_colors, 3, dtype=torch.uint8)
    index_map, palette = _quantize_rgb(rgb, num_colors, method, dither)
    return torch.from_numpy(index_map), torch.from_numpy(palette)
