"""Fused colour-quantization ops (C++/CPU and CUDA kernels, namespace ``torch.ops.colorquant``).

Importing this package loads the compiled extension; if it is not built, the
import fails with a message saying how to build it. The pure-PyTorch maths of
the same ops is in :mod:`colorquant_ops.ops.reference`.
"""

from .._extension import cuda_kernels_compiled
from .color_quantize import (
    HardQuantized,
    SoftQuantized,
    hard_color_quantize,
    palette_distance,
    render_index_map,
    soft_color_quantize,
)
from .palette_ops import KMeansPalette, floyd_steinberg_dither, kmeans_palette

__all__ = [
    "HardQuantized",
    "KMeansPalette",
    "SoftQuantized",
    "cuda_kernels_compiled",
    "floyd_steinberg_dither",
    "hard_color_quantize",
    "kmeans_palette",
    "palette_distance",
    "render_index_map",
    "soft_color_quantize",
]
