"""Argument types and option handling shared by the ``colorquant`` commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from ..models.colorcnn import load_colorcnn_checkpoint
from ..models.colorcnn_plus import load_colorcnn_plus
from ..normalization import NORMALIZATION_BEFORE_RECORDING
from . import distributed

__all__ = ["checkpoint_label", "integer", "load_colorcnn_list", "load_colorcnn_plus_for", "load_colorcnns",
           "load_one_line", "positive_int", "single_process_device"]


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def single_process_device(name) -> torch.device:
    """``--device`` of a single-process command (default: cuda if available)."""
    return distributed.resolve_device(name, distributed.SINGLE)


def load_one_line(loader, path):
    """``loader(path)``, with a one-line message when the file cannot be read (torch.load's
    unpickling errors span several lines)."""
    try:
        return loader(path)
    except ValueError as exc:
        text = str(exc)
        if "\n" not in text:
            raise
        head, sep, _ = text.partition(" (cannot read it:")
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else ""
        raise ValueError(f"{head} (cannot read it: {cause})" if sep and cause else " ".join(text.split())) from exc


def checkpoint_label(path) -> str:
    """A short name of a checkpoint file for tables: its stem, or its run directory's name for the
    files ``colorquant train`` writes (``runs/x/final.pt`` -> ``x``; ``best.pt`` / ``last.pt`` ->
    ``x/best`` / ``x/last``), so that a run's checkpoint and its bundled copy
    (``assets/weights/x.pt``) read alike."""
    path = Path(path)
    if path.stem in ("final", "best", "last") and path.parent.name:
        return path.parent.name if path.stem == "final" else f"{path.parent.name}/{path.stem}"
    return path.stem


def load_colorcnn_list(paths, dataset: Optional[str], device: torch.device = torch.device("cpu")) -> list:
    """``[(path, model)]`` for ``--colorcnn`` checkpoints, in order, in evaluation mode on ``device``;
    each model takes [0, 1] images. A checkpoint trained on another dataset than ``dataset`` is refused;
    one that records neither its normalization nor its dataset gets ``dataset``'s normalization of then
    (:data:`~colorquant_ops.normalization.NORMALIZATION_BEFORE_RECORDING`: ``colorquant train`` always
    trained on normalized images), and without ``dataset`` it is refused."""
    models = []
    for path in paths:
        model, extra = load_one_line(load_colorcnn_checkpoint, path)
        recorded = extra.get("dataset")
        if recorded is not None and dataset is not None and recorded != dataset:
            raise ValueError(f"--colorcnn {path} was trained on {recorded} images, not --dataset {dataset}")
        if model.input_normalization is None:
            if dataset is None:
                raise ValueError(f"--colorcnn {path} does not record the normalization it expects; "
                                 f"pass --dataset (one of {', '.join(NORMALIZATION_BEFORE_RECORDING)})")
            model.input_normalization = NORMALIZATION_BEFORE_RECORDING[dataset]
        models.append((path, model.eval().requires_grad_(False).to(device)))
    return models


def load_colorcnns(paths, dataset: Optional[str], device: torch.device = torch.device("cpu")) -> dict:
    """``{K: (path, model)}``: :func:`load_colorcnn_list`, for commands that take one checkpoint per K
    (two with the same ``num_colors`` are refused)."""
    models = {}
    for path, model in load_colorcnn_list(paths, dataset, device):
        if model.num_colors in models:
            raise ValueError(f"--colorcnn: two checkpoints quantize to {model.num_colors} colours "
                             f"({models[model.num_colors][0]} and {path})")
        models[model.num_colors] = (path, model)
    return models


def load_colorcnn_plus_for(path, ks, device: torch.device = torch.device("cpu")):
    """The ``--colorcnn-plus`` checkpoint's network, in evaluation mode and frozen on ``device``; refused
    (one-line ValueError) when it cannot serve every K of ``ks``."""
    plus = load_one_line(load_colorcnn_plus, path).eval().requires_grad_(False).to(device)
    too_many = [k for k in ks if k > plus.max_colors]
    if too_many:
        raise ValueError(f"--colorcnn-plus {path} serves up to {plus.max_colors} colours, "
                         f"--num-colors asks for {too_many[0]}")
    return plus
