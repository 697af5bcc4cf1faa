"""The experiment's data: datasets by name, the seed paper's preprocessing, the CIFAR-10 JPEG copy, a tensor cache.

One module per job, all re-exported here::

    from colorquant_ops.experiment import data

    train = data.build_dataset("cifar10", "~/data", "train", transform=data.train_transform("cifar10"))
    test = data.build_dataset("cifar10", "~/data", "test", transform=data.test_transform("cifar10"))

* :mod:`.datasets` -- :func:`build_dataset` (CIFAR-10/100, STL-10, Tiny ImageNet, ImageFolder),
  class-balanced subsets (:func:`balanced_order`);
* :mod:`.preprocessing` -- :func:`train_transform`, :func:`test_transform`, :func:`normalize`,
  :data:`DATASET_STATS`;
* :mod:`.archives` -- :func:`extract_cifar10_jpeg`: the project's JPEG copy, checked and extracted once;
* :mod:`.cache` -- :func:`cache_as_tensors`, :class:`TensorImageDataset`, :func:`default_cache_dir`;
* :mod:`.locations` -- :func:`data_locations`: a command's ``--data-root`` / ``--cache-dir``;
* :mod:`.folders` -- class folders and :class:`DatasetNotFoundError`.
"""

from .archives import CIFAR10_JPEG_ARCHIVE, CIFAR10_JPEG_SHA256, extract_cifar10_jpeg, find_shared_cifar10_archive
from .cache import TensorImageDataset, cache_as_tensors, default_cache_dir
from .datasets import ImageFileDataset, balanced_order, build_dataset
from .folders import CIFAR10_CLASSES, STL10_CLASSES, DatasetNotFoundError
from .locations import data_locations
from .preprocessing import (
    DATASET_STATS,
    DATASETS,
    DatasetStats,
    Denormalize,
    classifier_normalization,
    denormalize,
    normalize,
    test_transform,
    train_transform,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_JPEG_ARCHIVE",
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
    "classifier_normalization",
    "data_locations",
    "default_cache_dir",
    "denormalize",
    "extract_cifar10_jpeg",
    "find_shared_cifar10_archive",
    "normalize",
    "test_transform",
    "train_transform",
]
