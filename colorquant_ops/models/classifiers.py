"""Classifiers that judge ColorCNN's quantized images, and their checkpoints.

Hou, Zheng, Gould, "Learning to Structure an Image with Few Colors", CVPR 2020,
train ColorCNN against a frozen classifier. On small images (CIFAR, SVHN,
Tiny-ImageNet: 32 to 64 pixels) the paper uses CIFAR-style networks, built here
as in the authors' code (github.com/hou-yz/color_distillation,
``color_distillation/models``):

* :class:`CifarAlexNet` -- five 3x3 convolutions (the first with stride 2),
  three 2x2 max-pools, global average pooling, dropout and one linear layer;
* :class:`CifarVGG` -- VGG16 with batch norm, without the last max-pool, then
  global average pooling and one linear layer (``models/vgg.py``);
* :func:`cifar_resnet18` -- torchvision's ResNet18 with a 3x3 stride-1 stem and
  no max-pool.

``"airbench94"`` / ``"airbench93"`` are :class:`~colorquant_ops.models.airbench.AirbenchNet`, a
fast CIFAR network after Keller Jordan's airbench (any image size; see :mod:`.airbench`).

On larger images any torchvision classification model is available by name
(:func:`build_classifier`), always randomly initialised: nothing here downloads
weights.
"""

import torch
import torchvision
from torch import Tensor, nn

from .._checkpoint import build_checked, read_checkpoint
from .._io import save_atomic
from .._validation import check_int as _check_int
from .airbench import AIRBENCH_ARCHS, AIRBENCH_WIDTHS, AirbenchNet

__all__ = [
    "CIFAR_MAX_IMAGE_SIZE",
    "CLASSIFIER_ARCHS",
    "CifarAlexNet",
    "CifarVGG",
    "build_classifier",
    "cifar_resnet18",
    "load_classifier",
    "save_classifier",
]

#: Tag of the checkpoint format written by :func:`save_classifier`.
CHECKPOINT_FORMAT = "colorquant_ops.classifier/1"

#: Network layout version a checkpoint records (``"layout"``). 1 (checkpoints without the entry):
#: the CIFAR VGG16 ended in a global *max*-pool; 2: the paper's code's VGG16, the last max-pool
#: dropped and global *average* pooling. :func:`load_classifier` rebuilds the layout a checkpoint
#: was trained with.
CLASSIFIER_LAYOUT = 2

#: Architectures with a CIFAR-sized version (used when ``image_size <= CIFAR_MAX_IMAGE_SIZE``).
CLASSIFIER_ARCHS = ("alexnet", "vgg16", "resnet18")

#: Largest image size for which :func:`build_classifier` picks the CIFAR-sized
#: version of an architecture in :data:`CLASSIFIER_ARCHS` (Tiny-ImageNet is 64).
CIFAR_MAX_IMAGE_SIZE = 64

#: VGG16 layer configuration: output channels of each 3x3 conv, "M" a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

_CKPT_KEYS = ("arch", "num_classes", "image_size", "state_dict")
_RESERVED = ("format", "layout", *_CKPT_KEYS)


class CifarAlexNet(nn.Module):
    """AlexNet for 32x32 images, the paper's (and its code's) CIFAR version.

    ``features``: conv 64 (3x3, stride 2, padding 1) -> ReLU -> max-pool 2 ->
    conv 192 -> ReLU -> max-pool 2 -> conv 384 -> ReLU -> conv 256 -> ReLU ->
    conv 256 -> ReLU -> max-pool 2 (all 3x3, padding 1); then global average
    pooling, ``classifier = Dropout(0.5) -> Linear(256, num_classes)``.
    About 2.25 M parameters for 10 classes.

    Shape:
        - Input: ``[B, in_channels, H, W]`` with ``H, W >= 16`` (stride 2 and
          three 2x2 pools).
        - Output: ``[B, num_classes]`` logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 images, as in the paper's code (``models/vgg.py``).

    Every number in ``cfg`` is a 3x3 conv (padding 1) -> BatchNorm -> ReLU and
    every ``"M"`` a 2x2 max-pool, except that the last ``"M"`` is dropped
    (``features[-1]`` is an ``nn.Identity``); then global average pooling
    (``avgpool``, over the 2x2 map of a 32x32 input) and ``classifier =
    Linear(512, num_classes)``. The default ``cfg`` is VGG16 (about 14.7 M
    parameters for 10 classes).

    ``global_pool="max"`` builds this project's earlier layout (layout 1 of
    :data:`CLASSIFIER_LAYOUT`): the last ``"M"`` a global max-pool
    (``AdaptiveMaxPool2d(1)`` in ``features[-1]``, no ``avgpool``), for its
    checkpoints; the parameters are the same.

    Shape:
        - Input: ``[B, in_channels, H, W]`` with ``H, W >= 2 ** (number of "M" - 1)``
          (16 for VGG16).
        - Output: ``[B, num_classes]`` logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg=VGG16_CFG, global_pool: str = "avg") -> None:
        super().__init__()
        layers = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        if not layers or not isinstance(layers[-1], nn.MaxPool2d):
            raise ValueError("cfg must end with 'M'")
        if global_pool not in ("avg", "max"):
            raise ValueError(f"global_pool must be 'avg' or 'max', got {global_pool!r}")
        self.global_pool = global_pool
        # layout 1: a global max-pool; the paper's code: features[-1] = nn.Sequential(), then average pooling
        layers[-1] = nn.AdaptiveMaxPool2d((1, 1)) if global_pool == "max" else nn.Identity()
        self.features = nn.Sequential(*layers)
        if global_pool == "avg":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.global_pool == "avg":
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet18 for 32x32 images: torchvision's ``resnet18`` (BasicBlock
    ``[2, 2, 2, 2]``, adaptive average pooling, ``fc``) with a 3x3 stride-1
    stem convolution and no max-pool, as in the paper's code. Randomly
    initialised (about 11.2 M parameters for 10 classes).

    Shape:
        - Input: ``[B, in_channels, H, W]``, any ``H, W >= 1``.
        - Output: ``[B, num_classes]`` logits.
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    return model


_CIFAR_BUILDERS = {
    "alexnet": CifarAlexNet,
    "vgg16": CifarVGG,
    "resnet18": cifar_resnet18,
}


def _torchvision_archs():
    return torchvision.models.list_models(module=torchvision.models)


def build_classifier(arch: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """Build a randomly initialised classifier (never downloads weights).

    Args:
        arch: ``"alexnet"``, ``"vgg16"`` or ``"resnet18"`` (see
            :data:`CLASSIFIER_ARCHS`) -- the CIFAR-sized versions when
            ``image_size <= 64`` -- or the name of any torchvision
            classification model (``torchvision.models.list_models(module=torchvision.models)``),
            built with ``torchvision.models.get_model(arch, num_classes=num_classes, weights=None)``.
            Note that above 64 pixels ``"vgg16"`` is torchvision's VGG16
            *without* batch norm; pass ``"vgg16_bn"`` for the variant the
            paper's code uses on ImageNet. ``"airbench94"`` / ``"airbench93"``:
            :class:`~colorquant_ops.models.airbench.AirbenchNet` at any ``image_size``.
        num_classes: number of output logits, >= 1.
        image_size: side of the (square) input images; it only selects the
            CIFAR or the torchvision version, the models accept other sizes.

    Raises:
        ValueError: unknown ``arch``, or ``num_classes`` / ``image_size`` < 1.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string, got {type(arch).__name__}")
    num_classes = _check_int(num_classes, "num_classes", 1)
    image_size = _check_int(image_size, "image_size", 1)
    if arch in AIRBENCH_ARCHS:
        return AirbenchNet(num_classes, AIRBENCH_WIDTHS[arch])
    if arch in _CIFAR_BUILDERS and image_size <= CIFAR_MAX_IMAGE_SIZE:
        return _CIFAR_BUILDERS[arch](num_classes)
    if arch not in _torchvision_archs():
        raise ValueError(
            f"unknown classifier arch {arch!r}: use one of the CIFAR-sized {list(CLASSIFIER_ARCHS)}, "
            f"{' or '.join(AIRBENCH_ARCHS)} "
            "or a torchvision classification model, see "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    return torchvision.models.get_model(arch, num_classes=num_classes, weights=None)


def save_classifier(model: nn.Module, path, arch: str, num_classes: int, image_size: int, **extra) -> None:
    """Write ``model``'s weights with what :func:`load_classifier` needs to
    rebuild it (``build_classifier(arch, num_classes, image_size)``), plus any
    ``extra`` entries (e.g. ``epoch=...``, ``accuracy=...``; they must be
    loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings,
    lists, dicts)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra entries may not use the reserved keys {clash}")
    save_atomic(
        {
            "format": CHECKPOINT_FORMAT,
            # a CifarVGG rebuilt from a layout-1 checkpoint keeps its global max-pool
            "layout": 1 if isinstance(model, CifarVGG) and model.global_pool == "max" else CLASSIFIER_LAYOUT,
            "arch": arch,
            "num_classes": num_classes,
            "image_size": image_size,
            "state_dict": model.state_dict(),
            **extra,
        },
        path,
    )


def load_classifier(path, map_location="cpu") -> nn.Module:
    """Rebuild a classifier from a checkpoint written by :func:`save_classifier`.

    The model is returned as built (training mode); call ``.eval()`` (and
    freeze its parameters) to use it as ColorCNN's fixed judge. A checkpoint
    gets the network layout it was trained with (its ``"layout"``, see
    :data:`CLASSIFIER_LAYOUT`): a CIFAR VGG16 checkpoint without one ends in
    the global max-pool (``CifarVGG(global_pool="max")``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable classifier checkpoint, or its
            weights do not fit its architecture.
    """
    ckpt = read_checkpoint(path, CHECKPOINT_FORMAT, "classifier", map_location)
    missing = [k for k in _CKPT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a classifier checkpoint (missing entries {missing})")
    layout = ckpt.get("layout", 1)
    if not isinstance(layout, int) or not 1 <= layout <= CLASSIFIER_LAYOUT:
        raise ValueError(f"{path}: classifier layout {layout!r} is newer than this version reads "
                         f"(1..{CLASSIFIER_LAYOUT})")

    def build() -> nn.Module:
        model = build_classifier(ckpt["arch"], ckpt["num_classes"], ckpt["image_size"])
        if layout == 1 and isinstance(model, CifarVGG):
            # written before the VGG16 took the paper's global average pooling: its global max-pool
            model = CifarVGG(ckpt["num_classes"], global_pool="max")
        return model

    # the header sizes the model: checked against the weights' shapes before anything is allocated
    return build_checked(build, ckpt["state_dict"], path, f"classifier (arch {ckpt['arch']!r})")
