"""Datasets by name, read from a ``data_root`` directory, with class-balanced subsets.

* ``cifar10``, ``cifar100``, ``stl10``: torchvision's releases (``DIR/cifar-10-batches-py``,
  ``DIR/cifar-100-python``, ``DIR/stl10_binary``, also looked for one level down in ``DIR/<name>``),
  downloaded into ``DIR/<name>`` only when ``download=True``. The same names also read an
  ImageFolder layout ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` in ``DIR/<name>`` or ``DIR``,
  e.g. the JPEG copy of CIFAR-10 this project tests with
  (:func:`~colorquant_ops.experiment.data.archives.extract_cifar10_jpeg`).
* ``tiny200``: Tiny ImageNet 200 in ``DIR``, ``DIR/tiny-imagenet-200`` or ``DIR/tiny200``:
  ``train/<wnid>/images/*.JPEG`` and either the original ``val/images/*.JPEG`` +
  ``val/val_annotations.txt`` or a re-arranged ``val/<wnid>/`` (``split="test"`` reads ``val/``).
* ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` or ``DIR/test/<class>/*``.

A dataset that is not there raises :class:`DatasetNotFoundError`, whose message lists every
path looked at and how to supply the data; nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path
from typing import Callable, Optional, Sequence

import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .archives import CIFAR10_JPEG_ARCHIVE, find_shared_cifar10_archive, shared_archive_candidates
from .cache import cache_as_tensors
from .folders import CIFAR10_CLASSES, STL10_CLASSES, DatasetNotFoundError, PathLike, class_dirs, is_dir
from .preprocessing import DATASET_STATS, check_name

__all__ = ["ImageFileDataset", "balanced_order", "build_dataset"]


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
    extra = sorted(set(class_dirs(split_dir)) - set(class_to_idx))
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
                f"(or colorquant_ops.experiment.data.extract_cifar10_jpeg(cache_dir='{target}'))"
            )
        else:
            tried = ", ".join(str(p) for p in shared_archive_candidates())
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
        lines.append("pass data_root=DIR with DIR/train/<class>/* and DIR/val/<class>/* (or DIR/test/<class>/*)")
    return lines


def _not_found(
    name: str, data_root: Path, split: str, tried: list[tuple[Path, str]], extra: str = ""
) -> DatasetNotFoundError:
    what = _PRETTY.get(name, f"ImageFolder dataset ({split} split)")
    lines = [f"{what} not found under data_root={data_root}" + ("" if is_dir(data_root) else " (it does not exist)")]
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
        if is_dir(release):
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
            if is_dir(split_dir):
                classes = class_dirs(split_dir)
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
    if is_dir(root / "train"):
        return class_dirs(root / "train")
    wnids = root / "wnids.txt"
    if wnids.is_file():
        return sorted(line.strip() for line in wnids.read_text().splitlines() if line.strip())
    return [c for c in class_dirs(root / "val") if c != "images"]


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
        name = fields[0]
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            # a plain file name in val/images/: nothing outside the data root is read
            raise ValueError(f"{annotations}:{line_no}: {name!r} is not a file name in {val / 'images'}")
        samples.append((str(val / "images" / fields[0]), class_to_idx[fields[1]]))
    return ImageFileDataset(samples, classes, val, transform)


def _locate_tiny(data_root: Path, split: str, transform):
    tried = []
    for root in (data_root, data_root / "tiny-imagenet-200", data_root / "tiny200"):
        sub = "train" if split == "train" else "val"
        tried.append((root / sub, "train/<wnid>/images/*.JPEG" if sub == "train" else
                      "val/images/*.JPEG + val/val_annotations.txt, or val/<wnid>/*.JPEG"))
        if not is_dir(root / sub):
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
        if is_dir(split_dir):
            classes = class_dirs(data_root / "train") if is_dir(data_root / "train") else class_dirs(split_dir)
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
    name = check_name(name)
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

