"""colorquant_ops: learned colour quantization (ColorCNN) with fused C++/CUDA torch ops."""

from . import ops
from .ops import hard_color_quantize, render_index_map, soft_color_quantize

__version__ = "0.1.0"

__all__ = ["hard_color_quantize", "ops", "render_index_map", "soft_color_quantize"]
