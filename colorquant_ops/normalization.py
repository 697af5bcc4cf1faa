"""The input normalizations networks of this project are trained with, per dataset.

``DATASET_NORMALIZATION[name] = (mean, std)``: the per-channel statistics that ``v2.Normalize``
applies before a classifier or ColorCNN sees an image (the seed paper's preprocessing). A ColorCNN
checkpoint records the dataset it was trained on; this table turns that name into the
normalization its network expects.

:data:`NORMALIZATION_BEFORE_RECORDING` is what networks were trained with before their checkpoints
recorded it: the same, except STL-10, which this project first normalized with its own statistics
(the paper's code uses ImageNet's).
"""

from __future__ import annotations

__all__ = ["DATASET_NORMALIZATION", "NORMALIZATION_BEFORE_RECORDING"]

_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
# The std used by the seed paper's code (and most CIFAR training scripts). It is not the
# per-pixel std of CIFAR-10 (about 0.247, 0.243, 0.261), so normalized CIFAR images have a
# mean near 0 but a std near 1.2; kept as is to match the paper's preprocessing.
_CIFAR_STD = (0.2023, 0.1994, 0.2010)
# STL-10: the paper's code (grid_downsample.py, color_cnn_downsample.py) normalizes it with ImageNet's
# statistics. This project first used STL-10's own (the per-channel mean/std of its training images),
# which checkpoints from then expect: NORMALIZATION_BEFORE_RECORDING.
_STL10_MEAN = (0.4467, 0.4398, 0.4066)
_STL10_STD = (0.2603, 0.2566, 0.2713)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DATASET_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar100": (_CIFAR_MEAN, _CIFAR_STD),
    "stl10": (_IMAGENET_MEAN, _IMAGENET_STD),
    "tiny200": (_IMAGENET_MEAN, _IMAGENET_STD),
    "imagefolder": (_IMAGENET_MEAN, _IMAGENET_STD),
}

#: The normalization of networks whose checkpoints name their dataset but record no normalization
#: (ColorCNN checkpoints without ``input_normalization``, classifier checkpoints without it).
NORMALIZATION_BEFORE_RECORDING = {**DATASET_NORMALIZATION, "stl10": (_STL10_MEAN, _STL10_STD)}
