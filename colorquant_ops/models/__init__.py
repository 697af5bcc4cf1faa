"""Models built on the fused colour-quantization ops: :class:`ColorCNN` and its backbones, and the
classifiers that judge it (:mod:`.classifiers`: the seed paper's CIFAR AlexNet / VGG16 / ResNet-18
and torchvision's models, with their checkpoint format), and the bundled pretrained weights by name
(:mod:`.pretrained`)."""

from .backbones import DnCNN, UNet
from .classifiers import build_classifier, load_classifier, save_classifier
from .colorcnn import ColorCNN, ColorCNNOutput, load_colorcnn, save_colorcnn
from .pretrained import PRETRAINED_CLASSIFIERS, PRETRAINED_COLORCNN, pretrained_classifier

__all__ = ["PRETRAINED_CLASSIFIERS", "PRETRAINED_COLORCNN", "ColorCNN", "ColorCNNOutput", "DnCNN", "UNet",
           "build_classifier", "load_classifier", "load_colorcnn", "pretrained_classifier", "save_classifier",
           "save_colorcnn"]
