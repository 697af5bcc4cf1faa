"""Reading the library's model checkpoints, with one set of clear errors."""

import torch


def read_checkpoint(path, fmt: str, what: str, map_location="cpu") -> dict:
    """Load a checkpoint dict tagged ``{"format": fmt, ...}`` (``weights_only``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read or is not a ``what`` checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} checkpoint not found: {path}") from None
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"{path} is not a {what} checkpoint (cannot read it: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} checkpoint (expected format {fmt!r})")
    return ckpt
