"""Models built on the fused colour-quantization ops: :class:`ColorCNN` and its backbones."""

from .backbones import DnCNN, UNet
from .colorcnn import ColorCNN, ColorCNNOutput, load_colorcnn, save_colorcnn

__all__ = ["ColorCNN", "ColorCNNOutput", "DnCNN", "UNet", "load_colorcnn", "save_colorcnn"]
