"""Traditional colour quantizers (the seed paper's PIL baselines) and plain references.

* :func:`pil_quantize` -- median cut / octree / k-means via PIL's ``Image.quantize``,
  optionally Floyd-Steinberg dithered, on ``[B,3,H,W]`` tensors; returns the
  library's ``(index_map [B,H,W] int64, palette [B,K,3])`` pair.
* :mod:`colorquant_ops.quantizers.reference` -- pure Python/NumPy/PyTorch
  references (Floyd-Steinberg error diffusion, k-means inertia, colour count).
"""

from . import reference
from .pil import METHODS, pil_quantize, pil_quantize_image
from .reference import count_colors, floyd_steinberg_reference, kmeans_inertia

__all__ = [
    "METHODS",
    "count_colors",
    "floyd_steinberg_reference",
    "kmeans_inertia",
    "pil_quantize",
    "pil_quantize_image",
    "reference",
]
