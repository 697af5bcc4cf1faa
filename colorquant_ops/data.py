"""Datasets and the seed paper's preprocessing.

Datasets by name (:data:`DATASETS`), all read from a ``data_root`` directory::

    from colorquant_ops import data

    train = data.build_dataset("cifar10", "~/data", "train", transform=data.train_transform("cifar10"))
    test = data.build_dataset("cifar10", "~/data", "test", transform=data.test_transform("cifar10"))

* ``cifar10``, ``cifar100``, ``stl10``: torchvision's releases (``DIR/cifar-10-batches-py``,
  ``DIR/cifar-100-python``, ``DIR/stl10_binary``, also looked for one level down in ``DIR/<name>``),
  downloaded into ``DIR/<name>`` only when ``download=True``. The same names also read an
  ImageFolder layout ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` in ``DIR/<name>`` or ``DIR``,
  e.g. the JPEG copy of CIFAR-10 this project tests with (:func:`extract_cifar10_jpeg`).
* ``tiny200``: Tiny ImageNet 200 in ``DIR``, ``DIR/tiny-imagenet-200`` or ``DIR/tiny200``:
  ``train/<wnid>/images/*.JPEG`` and either the original ``val/images/*.JPEG`` +
  ``val/val_annotations.txt`` or a re-arranged ``val/<wnid>/`` (``split="test"`` reads ``val/``).
* ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` or ``DIR/test/<class>/*``.

A dataset that is not there raises :class:`DatasetNotFoundError`, whose message lists every
path looked at and how to supply the data; nothing is downloaded unless ``download=True``.

Preprocessing (:func:`train_transform`, :func:`test_transform`, :data:`DATASET_STATS`) is built
from ``torchvision.transforms.v2`` and ends with ``ToImage -> ToDtype(float32) -> Normalize``;
``normalize=False`` stops before ``Normalize`` so that a colour quantizer can be inserted::

    v2.Compose([data.train_transform("cifar10", normalize=False), ColorQuantize(4), data.normalize("cifar10")])

Decoded datasets can be cached as uint8 tensors (``build_dataset(..., cache_dir=...)``,
:func:`cache_as_tensors`, :class:`TensorImageDataset`): decoding 50,000 JPEGs takes a while on a
CPU, loading the cached tensor a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2._utils import is_pure_tensor

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_SHA256",
    "DATASETS",
    "DATASET_STATS",
    "DatasetNotFoundError",
    "DatasetStats",
    "Denormalize",
    "ImageFileDataset",
    "STL10_CLASSES",
    "TensorImageDataset",
    "balanced_order",
    "build_dataset",
    "cache_as_tensors",
    "default_cache_dir",
    "denormalize",
    "extract_cifar10_jpeg",
    "find_shared_cifar10_archive",
    "normalize",
    "test_transform",
    "train_transform",
]

PathLike = Union[str, os.PathLike]

#: Names accepted by :func:`build_dataset` and the transform helpers.
DATASETS = ("cifar10", "cifar100", "stl10", "tiny200", "imagefolder")

#: CIFAR-10's label order (torchvision's ``CIFAR10.classes``, read from ``batches.meta``); also alphabetical.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: STL-10's label order (``class_names.txt``); also alphabetical.
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

#: sha256 of ``../shared/data/cifar10-jpeg.tar.gz`` (from ``shared/data/README.md``).
CIFAR10_JPEG_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"

_REPO_ROOT = Path(__file__).resolve().parents[1]
_MARKER = ".extracted"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for. ``paths``: every path tried."""

    def __init__(self, message: str, paths: Sequence[PathLike] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(Path(p) for p in paths)

    def __str__(self) -> str:  # OSError's str() of a one-argument error is the argument
        return self.args[0] if self.args else ""


# --------------------------------------------------------------------------------------------
# Statistics and transforms
# --------------------------------------------------------------------------------------------


class DatasetStats(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int  #: side of the (square) network input
    num_classes: Optional[int]  #: ``None`` for ``imagefolder`` (read ``dataset.classes``)


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
# The std used by the seed paper's code (and most CIFAR training scripts). It is not the
# per-pixel std of CIFAR-10 (about 0.247, 0.243, 0.261), so normalized CIFAR images have a
# mean near 0 but a std near 1.2; kept as is to match the paper's preprocessing.
_CIFAR_STD = (0.2023, 0.1994, 0.2010)
# STL-10: the paper does not list its statistics; these are the commonly used values
# (per-channel mean/std of the STL-10 training images).
_STL10_MEAN = (0.4467, 0.4398, 0.4066)
_STL10_STD = (0.2603, 0.2566, 0.2713)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``DATASET_STATS[name] = (mean, std, image_size, num_classes)``.
DATASET_STATS: dict[str, DatasetStats] = {
    "cifar10": DatasetStats(_CIFAR_MEAN, _CIFAR_STD, 32, 10),
    "cifar100": DatasetStats(_CIFAR_MEAN, _CIFAR_STD, 32, 100),
    "stl10": DatasetStats(_STL10_MEAN, _STL10_STD, 96, 10),
    "tiny200": DatasetStats(_IMAGENET_MEAN, _IMAGENET_STD, 64, 200),
    "imagefolder": DatasetStats(_IMAGENET_MEAN, _IMAGENET_STD, 224, None),
}

# random-crop padding of the fixed-size datasets (an eighth of the side)
_CROP_PADDING = {"cifar10": 4, "cifar100": 4, "stl10": 12, "tiny200": 8}


def _check_name(name: str) -> str:
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
    name = _check_name(name)
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
    name = _check_name(name)
    size = _image_size(name, image_size)
    geometric = []
    if name == "imagefolder":
        geometric = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*geometric, *_to_float(name, normalize)])


def normalize(name: str) -> v2.Normalize:
    """``v2.Normalize`` with the dataset's mean and std (float images in [0,1] in)."""
    stats = DATASET_STATS[_check_name(name)]
    return v2.Normalize(mean=list(stats.mean), std=list(stats.std))


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
    stats = DATASET_STATS[_check_name(name)]
    return Denormalize(stats.mean, stats.std, clamp=clamp)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


def _pil_rgb(path: str) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


class ImageFileDataset(Dataset):
    """``(image, label)`` pairs from a list of image files: PIL RGB images (or ``transform(image)``).

    Attributes: ``samples`` (list of ``(path, label)``), ``targets``, ``classes``, ``class_to_idx``, ``root``.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: Sequence[str],
        root: PathLike,
        transform: Optional[Callable] = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.root = Path(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = _pil_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, classes={len(self.classes)}, "
            f"transform={self.transform!r})"
        )


class _LabelledSubset(Subset):
    """``torch.utils.data.Subset`` that keeps ``classes`` and ``targets``."""

    @property
    def classes(self):
        return self.dataset.classes

    @property
    def targets(self):
        base = _targets(self.dataset)
        return [base[i] for i in self.indices]


def _targets(dataset) -> list[int]:
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return [int(t) for t in value]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow path: decodes every sample


def balanced_order(targets: Sequence[int], seed: int = 0) -> Tensor:
    """A seeded random permutation of ``range(len(targets))`` that cycles through the classes:
    the first ``N`` indices hold ``N / num_classes`` samples of each class, up to one (as long as
    the class has that many). Taking a prefix gives a class-balanced random subset, and the
    subset for ``N`` is a prefix of the subset for ``M > N``."""
    targets = torch.as_tensor(list(targets), dtype=torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(targets), generator=g)
    jitter = torch.rand(len(targets), generator=g, dtype=torch.float64)
    # rank of each (randomly ordered) sample within its class
    by_class = perm[torch.sort(targets[perm], stable=True).indices]
    labels = targets[by_class]
    starts = torch.searchsorted(labels, labels, side="left")
    rank = torch.arange(len(labels)) - starts
    # rank first (round r holds the r-th sample of every class), classes shuffled within a round
    key = rank.to(torch.float64) + jitter[: len(labels)]
    return by_class[torch.sort(key, stable=True).indices]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _class_dirs(directory: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def _check_classes(name: str, classes: Sequence[str], where: Path) -> None:
    expected = {"cifar10": CIFAR10_CLASSES, "stl10": STL10_CLASSES}.get(name)
    if expected is not None and tuple(classes) != expected:
        raise ValueError(
            f"{where} does not hold {name}'s classes: expected folders {list(expected)}, found {list(classes)}"
        )
    num_classes = DATASET_STATS[name].num_classes
    if num_classes is not None and len(classes) != num_classes:
        raise ValueError(f"{where} holds {len(classes)} class folders; {name} has {num_classes}")


def _folder_dataset(split_dir: Path, classes: Sequence[str], transform) -> ImageFileDataset:
    class_to_idx = {c: i for i, c in enumerate(classes)}
    extra = sorted(set(_class_dirs(split_dir)) - set(class_to_idx))
    if extra:
        raise ValueError(f"{split_dir} has class folders that are not in the class list: {extra[:10]}")
    try:
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{split_dir}: {exc}", [split_dir]) from None
    if not samples:
        raise DatasetNotFoundError(f"{split_dir} holds no images (extensions {IMG_EXTENSIONS})", [split_dir])
    return ImageFileDataset(samples, classes, split_dir, transform)


_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}

# torchvision dataset class of each name (its ``base_folder`` is the release's directory)
_TORCHVISION = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100, "stl10": tv_datasets.STL10}
_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "tiny200": "Tiny ImageNet 200"}


def _torchvision_dataset(name: str, root: Path, split: str, transform, download: bool):
    cls = _TORCHVISION[name]
    train = split == "train"
    kwargs = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    dataset = cls(str(root), transform=transform, download=download, **kwargs)
    if not hasattr(dataset, "targets"):
        dataset.targets = [int(t) for t in dataset.labels]  # STL10 keeps them as a numpy array `labels`
    return dataset


def _how_to_supply(name: str, data_root: Path) -> list[str]:
    pretty = _PRETTY.get(name, name)
    target = data_root / name
    lines = []
    if name in _TORCHVISION:
        lines.append(
            f"download {pretty} into {target} with download=True (--download) on a machine with network "
            f"access, or copy torchvision's {_TORCHVISION[name].base_folder}/ there"
        )
        lines.append(f"or put an ImageFolder copy (train/<class>/*.jpg, test/<class>/*.jpg) into {target}")
    if name == "cifar10":
        archive = find_shared_cifar10_archive()
        if archive is not None:
            lines.append(
                f"or extract the project's JPEG copy {archive} into {target}: "
                f"`mkdir -p {target} && tar -xzf {archive} -C {target}` "
                f"(or colorquant_ops.data.extract_cifar10_jpeg(cache_dir='{target}'))"
            )
        else:
            tried = ", ".join(str(p) for p in _shared_archive_candidates())
            lines.append(
                f"or extract ../shared/data/{CIFAR10_JPEG_ARCHIVE} into {target} "
                f"(not found here; looked at {tried})"
            )
    if name == "tiny200":
        lines.append(
            f"download http://cs231n.stanford.edu/tiny-imagenet-200.zip on a machine with network access "
            f"and unzip it into {data_root} (giving {data_root / 'tiny-imagenet-200'}/train and /val)"
        )
    if name == "imagefolder":
        lines.append(f"pass data_root=DIR with DIR/train/<class>/* and DIR/val/<class>/* (or DIR/test/<class>/*)")
    return lines


def _not_found(
    name: str, data_root: Path, split: str, tried: list[tuple[Path, str]], extra: str = ""
) -> DatasetNotFoundError:
    what = _PRETTY.get(name, f"ImageFolder dataset ({split} split)")
    lines = [f"{what} not found under data_root={data_root}" + ("" if _is_dir(data_root) else " (it does not exist)")]
    if extra:
        lines.append(extra)
    lines.append("Looked for:")
    lines += [f"  {path}  ({why})" for path, why in tried]
    lines.append("To supply it:")
    lines += [f"  * {line}" for line in _how_to_supply(name, data_root)]
    return DatasetNotFoundError("\n".join(lines), [path for path, _ in tried])


def _locate_named(name: str, data_root: Path, split: str, transform, download: bool):
    """cifar10 / cifar100 / stl10: torchvision's release, else an ImageFolder layout."""
    cls = _TORCHVISION[name]
    roots = [data_root / name, data_root]
    tried = []
    for root in roots:
        release = root / cls.base_folder
        tried.append((release, f"torchvision's {_PRETTY[name]} release"))
        if _is_dir(release):
            try:
                return _torchvision_dataset(name, root, split, transform, download), release
            except (OSError, RuntimeError, ValueError) as exc:  # "Dataset not found or corrupted", failed download
                raise _not_found(
                    name, data_root, split, tried,
                    extra=f"{release} exists but failed torchvision's integrity check "
                    f"({type(exc).__name__}: {exc}); it is incomplete or corrupted: delete it and supply it again",
                ) from None
    for root in roots:
        for sub in _SPLIT_DIRS[split]:
            split_dir = root / sub
            tried.append((split_dir, f"ImageFolder layout {sub}/<class>/*.jpg"))
            if _is_dir(split_dir):
                classes = _class_dirs(split_dir)
                _check_classes(name, classes, split_dir)
                return _folder_dataset(split_dir, classes, transform), split_dir
    if not download:
        raise _not_found(name, data_root, split, tried)
    target = data_root / name
    try:
        return _torchvision_dataset(name, target, split, transform, download=True), target / cls.base_folder
    except (OSError, RuntimeError, urllib.error.URLError, ValueError) as exc:
        raise _not_found(
            name, data_root, split, tried,
            extra=f"download=True: downloading into {target} failed: {type(exc).__name__}: {exc}",
        ) from None


def _tiny_classes(root: Path) -> list[str]:
    if _is_dir(root / "train"):
        return _class_dirs(root / "train")
    wnids = root / "wnids.txt"
    if wnids.is_file():
        return sorted(line.strip() for line in wnids.read_text().splitlines() if line.strip())
    return [c for c in _class_dirs(root / "val") if c != "images"]


def _tiny_val(root: Path, classes: list[str], transform) -> ImageFileDataset:
    val = root / "val"
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():  # re-arranged val/<wnid>/[images/]*.JPEG
        return _folder_dataset(val, classes, transform)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise ValueError(f"{annotations}:{line_no}: expected 'FILE<TAB>WNID...' with a known wnid, got {line!r}")
        samples.append((str(val / "images" / fields[0]), class_to_idx[fields[1]]))
    return ImageFileDataset(samples, classes, val, transform)


def _locate_tiny(data_root: Path, split: str, transform):
    tried = []
    for root in (data_root, data_root / "tiny-imagenet-200", data_root / "tiny200"):
        sub = "train" if split == "train" else "val"
        tried.append((root / sub, "train/<wnid>/images/*.JPEG" if sub == "train" else
                      "val/images/*.JPEG + val/val_annotations.txt, or val/<wnid>/*.JPEG"))
        if not _is_dir(root / sub):
            continue
        classes = _tiny_classes(root)
        _check_classes("tiny200", classes, root)
        if sub == "train":
            return _folder_dataset(root / "train", classes, transform), root / "train"
        return _tiny_val(root, classes, transform), root / "val"
    raise _not_found("tiny200", data_root, split, tried)


def _locate_imagefolder(data_root: Path, split: str, transform):
    tried = []
    for sub in _SPLIT_DIRS[split]:
        split_dir = data_root / sub
        tried.append((split_dir, f"ImageFolder layout {sub}/<class>/*"))
        if _is_dir(split_dir):
            classes = _class_dirs(data_root / "train") if _is_dir(data_root / "train") else _class_dirs(split_dir)
            return _folder_dataset(split_dir, classes, transform), split_dir
    raise _not_found("imagefolder", data_root, split, tried)


def build_dataset(
    name: str,
    data_root: PathLike,
    split: str = "train",
    transform: Optional[Callable] = None,
    download: bool = False,
    subset: Optional[int] = None,
    seed: int = 0,
    cache_dir: Optional[PathLike] = None,
) -> Dataset:
    """The ``split`` (``"train"``, ``"test"``; ``"val"`` is an alias of ``"test"`` that prefers a
    ``val/`` folder) of dataset ``name`` (one of :data:`DATASETS`) under ``data_root``, as a
    Dataset of ``(transform(image), label)``: images are PIL RGB images without a transform.

    Args:
        download: download torchvision's release into ``data_root/<name>`` if no copy is found
            (CIFAR-10/100, STL-10; needs network access). Without it nothing is downloaded.
        subset: keep only the first ``subset`` samples of a seeded random, class-balanced order
            (:func:`balanced_order`), e.g. a few hundred images for end-to-end tests.
        seed: seed of that order.
        cache_dir: decode the (sub)set once into a uint8 tensor saved in ``cache_dir``
            (e.g. :func:`default_cache_dir`) and return a :class:`TensorImageDataset` reading it;
            ``transform`` then gets uint8 tensors ``[3,H,W]`` instead of PIL images.

    The result has ``classes`` (class names in label order) and ``targets`` (labels).

    Raises:
        DatasetNotFoundError: the data is not there (the message lists the paths tried and how
            to supply it) or ``download=True`` failed.
        ValueError: unknown ``name`` or ``split``, bad ``subset``, or folders that do not hold the
            dataset's classes.
    """
    name = _check_name(name)
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be 'train', 'test' or 'val', got {split!r}")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive int or None, got {subset!r}")
    data_root = Path(data_root).expanduser()
    load_transform = None if cache_dir is not None else transform

    if name in _TORCHVISION:
        dataset, source = _locate_named(name, data_root, split, load_transform, download)
    elif name == "tiny200":
        dataset, source = _locate_tiny(data_root, split, load_transform)
    else:
        dataset, source = _locate_imagefolder(data_root, split, load_transform)

    if subset is not None:
        if subset > len(dataset):
            raise ValueError(f"subset={subset} but {source} holds only {len(dataset)} samples")
        indices = balanced_order(_targets(dataset), seed)[:subset].tolist()
        dataset = _LabelledSubset(dataset, indices)

    if cache_dir is None:
        return dataset
    source_id = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:10]
    part = "all" if subset is None else f"n{subset}-seed{seed}"
    path = Path(cache_dir).expanduser() / f"{name}-{split}-{part}-{source_id}.pt"
    return cache_as_tensors(dataset, path, transform=transform)


# --------------------------------------------------------------------------------------------
# Tensor cache
# --------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """``(transform(images[i]), int(labels[i]))`` from decoded images held as one uint8 tensor.

    Args:
        images: uint8 ``[N,3,H,W]``.
        labels: int64 ``[N]``.
        transform: applied to each uint8 ``[3,H,W]`` tensor; ``torchvision.transforms.v2``
            transforms (e.g. :func:`train_transform`) take tensors directly.
        classes: class names in label order (optional).
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Optional[Callable] = None,
                 classes: Optional[Sequence[str]] = None) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor [N, C, H, W]")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(images={tuple(self.images.shape)}, transform={self.transform!r})"


def _to_uint8_chw(image, index: int) -> Tensor:
    if isinstance(image, PIL.Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, Tensor) and image.dtype == torch.uint8 and image.dim() == 3:
        return image.as_subclass(Tensor)
    raise TypeError(
        f"cache_as_tensors needs raw images (PIL or uint8 [C,H,W] tensors), sample {index} is "
        f"{type(image).__name__}{'' if not isinstance(image, Tensor) else f' {image.dtype}'}: "
        "build the dataset with transform=None and pass the transform to the cache"
    )


_CACHE_FORMAT = 1


def cache_as_tensors(dataset: Dataset, path: PathLike, transform: Optional[Callable] = None,
                     progress: Optional[bool] = None) -> TensorImageDataset:
    """Decode ``dataset`` (raw ``(image, label)`` pairs, all images the same size) once into a
    uint8 tensor ``[N,3,H,W]`` + int64 labels saved at ``path`` with ``torch.save``; later calls load
    the file instead (if it holds ``len(dataset)`` samples, else it is rebuilt).

    Returns a :class:`TensorImageDataset` with ``transform``. ``progress``: tqdm bar while decoding
    (``None``: only on a terminal).
    """
    path = Path(path)
    n = len(dataset)
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            if blob.get("format") == _CACHE_FORMAT and blob["images"].shape[0] == n:
                return TensorImageDataset(blob["images"], blob["labels"], transform, blob.get("classes"))
            warnings.warn(f"{path} does not match the dataset ({n} samples); decoding it again", stacklevel=2)
        except Exception as exc:  # unreadable / truncated file: rebuild it
            warnings.warn(f"could not load the tensor cache {path} ({exc}); decoding it again", stacklevel=2)
    if n == 0:
        raise ValueError("cannot cache an empty dataset")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        def tqdm(iterable, **kwargs):
            return iterable

    images = labels = None
    disable = None if progress is None else not progress  # None: tqdm shows the bar only on a terminal
    for i in tqdm(range(n), desc=f"decoding {path.name}", unit="img", disable=disable):
        image, label = dataset[i]
        image = _to_uint8_chw(image, i)
        if images is None:
            images = torch.empty((n, *image.shape), dtype=torch.uint8)
            labels = torch.empty(n, dtype=torch.int64)
        elif image.shape != images.shape[1:]:
            raise ValueError(
                f"cache_as_tensors needs images of one size: sample 0 is {tuple(images.shape[1:])}, "
                f"sample {i} is {tuple(image.shape)} (resize them first)"
            )
        images[i] = image
        labels[i] = int(label)

    classes = getattr(dataset, "classes", None)
    classes = list(classes) if classes is not None else None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": _CACHE_FORMAT, "images": images, "labels": labels, "classes": classes}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return TensorImageDataset(images, labels, transform, classes)


# --------------------------------------------------------------------------------------------
# The project's JPEG copy of CIFAR-10
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``<repo>/.cache`` for a source checkout (git-ignored), else ``$XDG_CACHE_HOME/colorquant_ops``."""
    if (_REPO_ROOT / "pyproject.toml").is_file() and os.access(_REPO_ROOT, os.W_OK):
        return _REPO_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "colorquant_ops"


def _shared_archive_candidates() -> list[Path]:
    candidates = []
    for base in (_REPO_ROOT, Path.cwd()):
        path = (base.parent / "shared" / "data" / CIFAR10_JPEG_ARCHIVE).resolve()
        if path not in candidates:
            candidates.append(path)
    return candidates


def find_shared_cifar10_archive() -> Optional[Path]:
    """``../shared/data/cifar10-jpeg.tar.gz`` relative to the repository root or the current
    working directory, whichever exists first; ``None`` if neither does."""
    for path in _shared_archive_candidates():
        if path.is_file():
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _untar(archive: Path, dest: Path) -> None:
    tar = shutil.which("tar")
    if tar is not None:  # several times faster than tarfile for 60,000 small files
        result = subprocess.run([tar, "-xzf", str(archive), "-C", str(dest)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"extracting {archive} into {dest} failed: {result.stderr.strip()}")
        return
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover - Python without extraction filters (the sha256 is checked already)
            tf.extractall(dest)


def _extracted(dest: Path) -> bool:
    marker = dest / _MARKER
    return marker.is_file() and marker.read_text().strip() == CIFAR10_JPEG_SHA256


def extract_cifar10_jpeg(archive: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> Path:
    """Extract the project's JPEG copy of CIFAR-10 once and return its directory (holding
    ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; pass it as ``data_root`` with name ``"cifar10"``).

    Args:
        archive: ``cifar10-jpeg.tar.gz``; default :func:`find_shared_cifar10_archive`.
        cache_dir: where to extract; default ``default_cache_dir() / "cifar10-jpeg"``
            (``<repo>/.cache/cifar10-jpeg``, git-ignored).

    Idempotent: a marker file written after a complete extraction makes later calls return at
    once (without needing the archive). The archive's sha256 is checked before extracting.

    Raises:
        DatasetNotFoundError: no archive (lists the paths looked at).
        ValueError: the archive's sha256 is not :data:`CIFAR10_JPEG_SHA256`.
    """
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "cifar10-jpeg"
    if _extracted(dest):
        return dest
    if archive is None:
        archive = find_shared_cifar10_archive()
        if archive is None:
            tried = _shared_archive_candidates()
            raise DatasetNotFoundError(
                f"the CIFAR-10 JPEG archive {CIFAR10_JPEG_ARCHIVE} was not found; looked at:\n"
                + "".join(f"  {p}\n" for p in tried)
                + "pass archive=PATH, or run from a checkout next to shared/data/",
                tried,
            )
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise DatasetNotFoundError(f"the CIFAR-10 JPEG archive {archive} does not exist", [archive])
    digest = _sha256(archive)
    if digest != CIFAR10_JPEG_SHA256:
        raise ValueError(
            f"{archive} has sha256 {digest}, expected {CIFAR10_JPEG_SHA256} (shared/data/README.md): "
            "the file is corrupted or a different archive; not extracting it"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside dest and move it into place in one step; an existing dest without the
    # marker (an interrupted extraction) is extracted over, deleting nothing.
    target = dest if dest.exists() else Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".partial-"))
    try:
        _untar(archive, target)
        for split in ("train", "test"):
            classes = _class_dirs(target / split) if _is_dir(target / split) else []
            if tuple(classes) != CIFAR10_CLASSES:
                raise RuntimeError(
                    f"{archive} did not extract CIFAR-10's class folders into {target / split}: {classes}"
                )
        (target / _MARKER).write_text(CIFAR10_JPEG_SHA256 + "\n")
    except BaseException:
        if target != dest:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if target != dest:
        try:
            os.rename(target, dest)
        except OSError:  # another process finished first
            shutil.rmtree(target, ignore_errors=True)
            if not _extracted(dest):
                raise
    return dest
