"""Where a command's data lives: ``--data-root`` / ``--cache-dir`` resolved to paths."""

from __future__ import annotations

import argparse

from .archives import extract_cifar10_jpeg
from .cache import default_cache_dir
from .folders import DatasetNotFoundError

__all__ = ["data_locations"]


def data_locations(args: argparse.Namespace):
    """(data root, tensor-cache dir or None) from --data-root / --cache-dir.

    Without --data-root, CIFAR-10 comes from the shared JPEG copy (extracted once
    into .cache/) when it is present, anything else from ./data.
    """
    root = args.data_root
    if root is None:
        root = "data"
        if args.dataset == "cifar10":
            try:
                root = extract_cifar10_jpeg()
            except DatasetNotFoundError:
                pass
    cache = args.cache_dir
    if cache is None and args.dataset != "imagefolder":
        cache = default_cache_dir() / "tensors"
    if isinstance(cache, str) and cache.lower() == "none":
        cache = None
    return root, cache
