"""Argument types and option handling shared by the ``colorquant`` commands."""

from __future__ import annotations

import argparse

import torch

from . import distributed

__all__ = ["integer", "load_one_line", "positive_int", "single_process_device"]


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
