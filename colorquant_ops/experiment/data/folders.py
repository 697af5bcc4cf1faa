"""Class folders on disk, the datasets' class lists, and the error for data that is not there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

__all__ = ["CIFAR10_CLASSES", "STL10_CLASSES", "DatasetNotFoundError", "PathLike", "class_dirs", "is_dir"]

PathLike = Union[str, os.PathLike]

#: CIFAR-10's label order (torchvision's ``CIFAR10.classes``, read from ``batches.meta``); also alphabetical.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: STL-10's label order (``class_names.txt``); also alphabetical.
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for. ``paths``: every path tried."""

    def __init__(self, message: str, paths: Sequence[PathLike] = ()) -> None:
        super().__init__(message)
        self.paths = tuple(Path(p) for p in paths)

    def __str__(self) -> str:  # OSError's str() of a one-argument error is the argument
        return self.args[0] if self.args else ""


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def class_dirs(directory: Path) -> list[str]:
    """The sub-folders of ``directory`` (hidden ones left out), sorted: ImageFolder's class list."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
