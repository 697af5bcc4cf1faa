"""Reading the library's model checkpoints, with one set of clear errors.

A checkpoint is untrusted input: it is read with ``weights_only=True`` (no pickled code runs), and
the fields that size a model (architecture, classes, width, ...) are checked against the weights it
actually holds before the model is built for real (:func:`build_checked`): the model is first built
on the ``meta`` device, which allocates nothing, and its parameter names and shapes must be those of
the state dict, whose tensors must hold their data (no stride-0 expansion of a tiny storage). So a
small file cannot make the loader allocate more than about the size of its own weights.
"""

from typing import Callable

import torch
from torch import Tensor, nn


def _short(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_checkpoint(path, fmt: str, what: str, map_location="cpu") -> dict:
    """Load a checkpoint dict tagged ``{"format": fmt, ...}`` (``weights_only``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read or is not a ``what`` checkpoint (one line).
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is not a {what} checkpoint (it is a directory)") from None
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"{path} is not a {what} checkpoint (cannot read it: {_short(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} checkpoint (expected format {fmt!r})")
    return ckpt


def _check_tensors(state_dict, path, what: str) -> None:
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(f"{path} is not a {what} checkpoint (its state_dict is not a dict of named tensors)")
    for name, t in state_dict.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{path}: state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.numel() and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise ValueError(f"{path}: state_dict entry {name!r} of shape {tuple(t.shape)} holds only "
                             f"{t.untyped_storage().nbytes()} bytes of data")


def check_state_dict_fits(model: nn.Module, state_dict: dict, path, what: str) -> None:
    """``ValueError`` unless ``state_dict`` has exactly ``model``'s entries with its shapes
    (``model`` may live on the meta device)."""
    _check_tensors(state_dict, path, what)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {got[k]}, its header implies {expected[k]}"
                         + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
        raise ValueError(f"weights in {path} do not fit the {what} its header describes: {'; '.join(parts)}")


def build_checked(build: Callable[[], nn.Module], state_dict, path, what: str) -> nn.Module:
    """``build()`` on the meta device, checked against ``state_dict`` (:func:`check_state_dict_fits`),
    then ``build()`` for real with the weights loaded. ``build``'s TypeError / ValueError (bad header
    fields) become ValueErrors naming ``path``."""
    _check_tensors(state_dict, path, what)
    try:
        try:
            with torch.device("meta"):
                shape_model = build()
        except (NotImplementedError, RuntimeError):  # a model whose construction needs real data
            shape_model = None
        if shape_model is not None:
            check_state_dict_fits(shape_model, state_dict, path, what)
            del shape_model
        model = build()
    except (TypeError, ValueError) as exc:
        if str(path) in str(exc):
            raise ValueError(str(exc)) from exc
        raise ValueError(f"{path}: bad {what} checkpoint header: {_short(exc).split(': ', 1)[-1]}") from exc
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ValueError(f"weights in {path} do not fit the {what}: {_short(exc)}") from exc
    return model
