"""Models built on the fused colour-quantization ops: :class:`ColorCNN` and its backbones, and the
classifiers that judge it (:mod:`.classifiers`: the seed paper's CIFAR AlexNet / VGG16 / ResNet-18
and torchvision's models, with their checkpoint format), and the bundled pretrained weights by name
(:mod:`.pretrained`)."""

from .backbones import DnCNN, UNet
from .classifiers import build_classifier, load_classifier, save_classifier
from .colorcnn import ColorCNN, ColorCNNOutput, load_colorcnn, save_colorcnn
from .colorcnn_plus import ColorCNNPlus, load_colorcnn_plus, save_colorcnn_plus
from .pretrained import PRETRAINED_CLASSIFIERS, PRETRAINED_COLORCNN, PRETRAINED_COLORCNN_PLUS, pretrained_classifier

__all__ = ["PRETRAINED_CLASSIFIERS", "PRETRAINED_COLORCNN", "PRETRAINED_COLORCNN_PLUS", "ColorCNN", "ColorCNNOutput", "ColorCNNPlus", "DnCNN", "UNet",
           "build_classifier", "load_classifier", "load_colorcnn", "load_colorcnn_plus", "pretrained_classifier", "save_classifier",
           "save_colorcnn", "save_colorcnn_plus"]
