"""Plain Python/NumPy/PyTorch references for the quantizers.

They state the maths in the most direct form and are the oracles of the tests
of the batched C++ ops (and, for Floyd-Steinberg, the slowest benchmark
baseline). Shapes: image ``[C,H,W]`` or ``[B,C,H,W]``, palette ``[K,C]`` or
``[B,K,C]``, index map ``[H,W]`` or ``[B,H,W]`` (int64).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..ops.reference import render_index_map as _render

__all__ = [
    "count_colors",
    "nearest_colour",
    "floyd_steinberg_batch_reference",
    "floyd_steinberg_reference",
    "kmeans_inertia",
    "psnr",
]

# Floyd-Steinberg error-diffusion weights: (dy, dx, weight).
_FS_WEIGHTS = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def _as_float64_numpy(x, name):
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
    return x.astype(np.float64)


def nearest_colour(squared_differences: np.ndarray) -> int:
    """The nearest colour from ``(palette - value) ** 2`` ``[K,C]``, by the kernels' rule: colours
    are tried in order from 0 and a colour replaces the best so far only if its squared distance is
    strictly smaller. So a tie goes to the lowest ``k``, a NaN distance never wins against an earlier
    colour, and a NaN distance at colour 0 keeps colour 0."""
    dist = squared_differences.sum(axis=1)
    if np.isnan(dist[0]):
        return 0
    return int(np.argmin(np.where(np.isnan(dist), np.inf, dist)))  # argmin: the first minimum


def floyd_steinberg_reference(image, palette, clamp=None) -> Tensor:
    """Floyd-Steinberg error diffusion onto a fixed palette, as a Python double loop.

    Pixels are visited in raster order (row by row, left to right). Each takes
    ``value = pixel + accumulated error``, clamped to ``clamp = (low, high)`` if
    given (either bound may be None; NaN stays NaN), picks the nearest
    palette colour ``k`` by squared Euclidean distance over the channels
    (:func:`nearest_colour`: a tie goes to the lowest ``k``; NaN as the kernels
    treat it) and diffuses ``error = value - palette[k]`` with
    the weights 7/16 to ``(x+1, y)``, 3/16 to ``(x-1, y+1)``, 5/16 to
    ``(x, y+1)`` and 1/16 to ``(x+1, y+1)``; a weight whose target is outside
    the image is dropped. Everything is computed in float64.

    Args:
        image: ``[C,H,W]`` NumPy array or tensor.
        palette: ``[K,C]`` NumPy array or tensor, same colour scale as ``image``.
        clamp: ``None`` or ``(low, high)``.

    Returns:
        ``[H,W]`` int64 CPU tensor of palette indices.
    """
    low, high = (None, None) if clamp is None else clamp
    img = _as_float64_numpy(image, "image")
    pal = _as_float64_numpy(palette, "palette")
    if img.ndim != 3:
        raise ValueError(f"image must be [C,H,W], got shape {img.shape}")
    if pal.ndim != 2 or pal.shape[1] != img.shape[0] or pal.shape[0] < 1:
        raise ValueError(f"palette must be [K,C] with K >= 1 and C = {img.shape[0]}, got shape {pal.shape}")
    C, H, W = img.shape
    buf = img.copy()  # pixel values plus the error accumulated so far
    index_map = np.zeros((H, W), dtype=np.int64)
    for y in range(H):
        for x in range(W):
            value = buf[:, y, x]
            if low is not None:
                value[value < low] = low
            if high is not None:
                value[value > high] = high
            k = nearest_colour((pal - value) ** 2)
            index_map[y, x] = k
            error = value - pal[k]
            for dy, dx, weight in _FS_WEIGHTS:
                yy, xx = y + dy, x + dx
                if 0 <= yy < H and 0 <= xx < W:
                    buf[:, yy, xx] += error * weight
    return torch.from_numpy(index_map)


def floyd_steinberg_batch_reference(images, palette, clamp=None) -> Tensor:
    """:func:`floyd_steinberg_reference` image by image: images ``[B,C,H,W]``,
    palette ``[B,K,C]`` -> ``[B,H,W]`` int64 CPU tensor."""
    if len(images) != len(palette):
        raise ValueError(f"images and palette must have the same batch size, got {len(images)} and {len(palette)}")
    if len(images) == 0:
        shape = tuple(images.shape)
        if len(shape) != 4:
            raise ValueError(f"images must be [B,C,H,W], got shape {shape}")
        return torch.zeros(0, shape[2], shape[3], dtype=torch.int64)
    return torch.stack([floyd_steinberg_reference(img, pal, clamp) for img, pal in zip(images, palette)])


def kmeans_inertia(image: Tensor, index_map: Tensor, palette: Tensor) -> Tensor:
    """Within-cluster sum of squared distances of each image: ``[B]``.

    ``inertia[b] = sum_{c,h,w} (image[b,c,h,w] - palette[b, index_map[b,h,w], c])^2``.
    Computed in the promoted floating dtype of ``image`` and ``palette``
    (float64 when both are integer).
    """
    if image.dim() != 4 or index_map.dim() != 3 or palette.dim() != 3:
        raise ValueError(
            "expected image [B,C,H,W], index_map [B,H,W], palette [B,K,C]; got shapes "
            f"{tuple(image.shape)}, {tuple(index_map.shape)}, {tuple(palette.shape)}"
        )
    B, C, H, W = image.shape
    if tuple(index_map.shape) != (B, H, W) or palette.shape[0] != B or palette.shape[2] != C:
        raise ValueError(
            f"shape mismatch: image {tuple(image.shape)}, index_map {tuple(index_map.shape)}, "
            f"palette {tuple(palette.shape)}"
        )
    dtype = torch.promote_types(image.dtype, palette.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    rendered = _render(index_map.long(), palette.to(dtype))
    return (image.to(dtype) - rendered).pow(2).sum(dim=(1, 2, 3))


def count_colors(image: Tensor) -> Tensor:
    """Number of distinct colours (exactly equal ``C``-vectors) of each image: int64 ``[B]``.

    uint8 images of up to 3 channels: each pixel packed into one integer, marked in a table of
    ``256 ** C`` flags, a chunk of pixels at a time (memory: 16 MB plus a few bytes per pixel of a
    chunk, whatever the image size). Otherwise one ``torch.unique`` over the rows
    ``(b, c_0, ..., c_{C-1})`` of all pixels.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be [B,C,H,W], got shape {tuple(image.shape)}")
    B, C, H, W = image.shape
    if B == 0 or H * W == 0:
        return torch.zeros(B, dtype=torch.int64, device=image.device)
    if image.dtype == torch.uint8 and C <= 3:
        return _count_uint8_colors(image.detach())
    dtype = torch.float64 if image.is_floating_point() else torch.int64
    pixels = image.detach().to(dtype).permute(0, 2, 3, 1).reshape(B, H * W, C)
    batch = torch.arange(B, device=image.device, dtype=dtype).view(B, 1, 1).expand(B, H * W, 1)
    rows = torch.cat([batch, pixels], dim=2).reshape(B * H * W, C + 1)
    unique_rows = torch.unique(rows, dim=0)
    return torch.bincount(unique_rows[:, 0].long(), minlength=B)


_COUNT_CHUNK = 1 << 22  # pixels per step of _count_uint8_colors


def _count_uint8_colors(image: Tensor) -> Tensor:
    B, C, H, W = image.shape
    counts = torch.empty(B, dtype=torch.int64)
    seen = torch.empty(256**C, dtype=torch.bool, device=image.device)
    flat = image.reshape(B, C, H * W)
    for b in range(B):
        seen.zero_()
        for start in range(0, H * W, _COUNT_CHUNK):
            chunk = flat[b, :, start:start + _COUNT_CHUNK].to(torch.int32)
            code = chunk[0].clone()
            for c in range(1, C):
                code.mul_(256).add_(chunk[c])
            seen[code] = True
        counts[b] = seen.sum()
    return counts.to(image.device)


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images with values in [0, 1] (mean over all elements)."""
    mse = (a.double() - b.double()).square().mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))
