"""Decoded datasets as uint8 tensors on disk, and where the project keeps its caches.

Decoding 50,000 JPEGs takes a while on a CPU, loading the cached tensor a fraction of a second
(``build_dataset(..., cache_dir=...)``, :func:`cache_as_tensors`, :class:`TensorImageDataset`).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ..._io import save_atomic
from .folders import PathLike

__all__ = ["REPO_ROOT", "TensorImageDataset", "cache_as_tensors", "default_cache_dir"]

#: The source checkout this package runs from (when it is one: see :func:`default_cache_dir`).
REPO_ROOT = Path(__file__).resolve().parents[3]


def default_cache_dir() -> Path:
    """``<repo>/.cache`` for a source checkout (git-ignored), else ``$XDG_CACHE_HOME/colorquant_ops``."""
    if (REPO_ROOT / "pyproject.toml").is_file() and os.access(REPO_ROOT, os.W_OK):
        return REPO_ROOT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "colorquant_ops"


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
    save_atomic({"format": _CACHE_FORMAT, "images": images, "labels": labels, "classes": classes}, path)
    return TensorImageDataset(images, labels, transform, classes)

