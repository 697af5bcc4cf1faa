"""colorquant_ops: learned colour quantization (ColorCNN) with fused C++/CUDA torch ops.

The library, what other people's training code imports:

* :mod:`colorquant_ops.ops` -- the fused ops (``torch.ops.colorquant``) and their plain-PyTorch reference;
* :class:`ColorCNN` -- the seed paper's network; :class:`ColorCNNPlus` -- one network for every number of
  colours; the classifiers that judge them (:mod:`colorquant_ops.models`);
* :class:`colorquant_ops.transforms.ColorQuantize` -- a torchvision v2 transform;
* :mod:`colorquant_ops.quantizers` -- the traditional baselines;
* :mod:`colorquant_ops.codecs` -- palette PNG / JPEG size accounting;
* :mod:`colorquant_ops.losses` -- ColorCNN's training objective;
* :mod:`colorquant_ops.normalization` -- the input normalization each dataset's networks expect.

The experiment and the ``colorquant`` command live apart, in :mod:`colorquant_ops.experiment`,
which the library never imports.
"""

from . import ops
from .models import ColorCNN, ColorCNNOutput, ColorCNNPlus
from .ops import hard_color_quantize, palette_distance, render_index_map, soft_color_quantize

__version__ = "0.1.0"

__all__ = [
    "ColorCNN",
    "ColorCNNOutput",
    "ColorCNNPlus",
    "hard_color_quantize",
    "ops",
    "palette_distance",
    "render_index_map",
    "soft_color_quantize",
]
