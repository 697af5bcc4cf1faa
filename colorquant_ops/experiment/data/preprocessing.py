"""The seed paper's preprocessing: per-dataset statistics, training augmentation, test transform.

Built from ``torchvision.transforms.v2``; each pipeline ends with ``ToImage -> ToDtype(float32) ->
Normalize``, and ``normalize=False`` stops before ``Normalize`` so that a colour quantizer can be
inserted::

    v2.Compose([train_transform("cifar10", normalize=False), ColorQuantize(4), normalize("cifar10")])
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2._utils import is_pure_tensor

from ...normalization import DATASET_NORMALIZATION, NORMALIZATION_BEFORE_RECORDING

__all__ = ["DATASETS", "DATASET_STATS", "DatasetStats", "Denormalize", "check_name", "classifier_normalization",
           "denormalize", "normalize", "test_transform", "train_transform"]

#: Names accepted by :func:`~colorquant_ops.experiment.data.build_dataset` and the transform helpers.
DATASETS = ("cifar10", "cifar100", "stl10", "tiny200", "imagefolder")


class DatasetStats(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int  #: side of the (square) network input
    num_classes: Optional[int]  #: ``None`` for ``imagefolder`` (read ``dataset.classes``)


_SIZES = {"cifar10": (32, 10), "cifar100": (32, 100), "stl10": (96, 10), "tiny200": (64, 200), "imagefolder": (224, None)}

#: ``DATASET_STATS[name] = (mean, std, image_size, num_classes)``; mean and std from
#: :data:`colorquant_ops.normalization.DATASET_NORMALIZATION`.
DATASET_STATS: dict[str, DatasetStats] = {
    name: DatasetStats(*DATASET_NORMALIZATION[name], *_SIZES[name]) for name in DATASETS
}

# random-crop padding of the fixed-size datasets (an eighth of the side)
_CROP_PADDING = {"cifar10": 4, "cifar100": 4, "stl10": 12, "tiny200": 8}


def check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def _image_size(name: str, image_size: Optional[int]) -> int:
    native = DATASET_STATS[name].image_size
    if image_size is None:
        return native
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if name != "imagefolder" and image_size != native:
        raise ValueError(f"{name} images are {native}x{native}; image_size={image_size} is only for 'imagefolder'")
    return image_size


def _to_float(name: str, normalize_: bool) -> list:
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize_:
        steps.append(normalize(name))
    return steps


def train_transform(name: str, normalize: bool = True, image_size: Optional[int] = None) -> v2.Compose:
    """The paper's training augmentation for ``name``.

    CIFAR-10/100, STL-10, Tiny ImageNet: ``RandomCrop(size, padding=size/8)`` + horizontal flip;
    ``imagefolder``: ``RandomResizedCrop(image_size)`` (default 224) + flip. Then ``ToImage``,
    ``ToDtype(float32, scale=True)`` and, if ``normalize``, :func:`normalize` (the output is then a
    float tensor ``[3,S,S]``; without it, values in [0,1]). Takes PIL images or uint8 tensors.
    """
    name = check_name(name)
    size = _image_size(name, image_size)
    if name == "imagefolder":
        geometric = [v2.RandomResizedCrop(size, antialias=True)]
    else:
        geometric = [v2.RandomCrop(size, padding=_CROP_PADDING[name])]
    return v2.Compose([*geometric, v2.RandomHorizontalFlip(), *_to_float(name, normalize)])


def test_transform(name: str, normalize: bool = True, image_size: Optional[int] = None) -> v2.Compose:
    """The paper's evaluation preprocessing for ``name``: the image as is (CIFAR, STL-10,
    Tiny ImageNet) or ``Resize(image_size*8/7)`` + ``CenterCrop(image_size)`` (``imagefolder``:
    256/224 by default), then ``ToImage``, ``ToDtype(float32, scale=True)`` and optionally
    :func:`normalize`."""
    name = check_name(name)
    size = _image_size(name, image_size)
    geometric = []
    if name == "imagefolder":
        geometric = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*geometric, *_to_float(name, normalize)])


def normalize(name: str) -> v2.Normalize:
    """``v2.Normalize`` with the dataset's mean and std (float images in [0,1] in)."""
    stats = DATASET_STATS[check_name(name)]
    return v2.Normalize(mean=list(stats.mean), std=list(stats.std))


def classifier_normalization(path, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the classifier checkpoint at ``path`` was trained with: what it records
    (``input_normalization``, written by ``colorquant train-classifier``), else its ``dataset``'s of
    before checkpoints recorded it (STL-10: its own statistics, see
    :data:`~colorquant_ops.normalization.NORMALIZATION_BEFORE_RECORDING`), else ``dataset``'s."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # load_classifier reports unreadable checkpoints
        ckpt = {}
    recorded = ckpt.get("input_normalization") if isinstance(ckpt, dict) else None
    if recorded is not None:
        mean, std = recorded
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    name = ckpt.get("dataset") if isinstance(ckpt, dict) else None
    if name in NORMALIZATION_BEFORE_RECORDING:
        return NORMALIZATION_BEFORE_RECORDING[name]
    return DATASET_STATS[check_name(dataset)].mean, DATASET_STATS[check_name(dataset)].std


class Denormalize(v2.Transform):
    """Inverse of ``v2.Normalize(mean, std)``: ``x * std + mean`` on float images ``[..., C, H, W]``
    (optionally clamped to [0,1]). Works on single images and batches."""

    _transformed_types = (tv_tensors.Image, is_pure_tensor)

    def __init__(self, mean: Sequence[float], std: Sequence[float], clamp: bool = False) -> None:
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.clamp = bool(clamp)

    def transform(self, inpt, params):
        if not inpt.is_floating_point():
            raise TypeError(f"Denormalize needs a floating point tensor, got {inpt.dtype}")
        if inpt.dim() < 3 or inpt.shape[-3] != len(self.mean):
            raise ValueError(f"Denormalize needs images [..., {len(self.mean)}, H, W], got shape {tuple(inpt.shape)}")
        x = inpt.as_subclass(Tensor)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        out = torch.addcmul(mean, x, std)
        if self.clamp:
            out = out.clamp(0, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    def extra_repr(self) -> str:
        return f"mean={list(self.mean)}, std={list(self.std)}, clamp={self.clamp}"


def denormalize(name: str, clamp: bool = False) -> Denormalize:
    """Inverse of :func:`normalize`: normalized (e.g. quantized) tensors back to [0,1] images,
    for PNG size accounting and pictures. ``clamp=True`` clips rounding overshoot to [0,1]."""
    stats = DATASET_STATS[check_name(name)]
    return Denormalize(stats.mean, stats.std, clamp=clamp)


