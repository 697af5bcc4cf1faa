"""Writing files atomically: a file is either its old content or its complete new content.

Every checkpoint and result file the library and the ``colorquant`` command write goes through
:func:`atomic_write`: the data go to a temporary file in the same directory, which is flushed and
fsynced, then renamed over the target (``os.replace``; the directory is fsynced too). A kill at any
point leaves the previous file (or none) and at most a stray ``.<name>.*.tmp``; a full disk or a
file-size limit leaves the previous file intact and raises one :class:`OSError` naming the file and
the cause. The rename replaces a symbolic link at the target instead of writing through it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "save_atomic"]


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: ``torch.save`` turns it into
    ``RuntimeError: [enforce fail at inline_container.cc...] unexpected pos``, which names no cause."""

    def __init__(self, f) -> None:
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. a platform that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextlib.contextmanager
def atomic_write(path, text: bool = False) -> Iterator:
    """Open a temporary file beside ``path`` for writing (binary, or ``text=True``: UTF-8 text);
    when the block ends without error it is flushed, fsynced and renamed to ``path``.

    Raises:
        OSError: the file cannot be written (e.g. no space left, file too large, permission
            denied), naming ``path`` and the cause; ``path`` keeps its previous content and the
            temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    recorder = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with open(fd, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
            recorder = None if text else _RecordingFile(f)
            yield f if text else recorder
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = recorder.error if recorder is not None and recorder.error is not None else exc
        if isinstance(cause, OSError):
            error = OSError(f"cannot write {path}: {_cause(cause)}")  # str(): the message alone
            error.errno = cause.errno or errno.EIO
            raise error from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, text=True) as f:
        f.write(text)


def atomic_write_json(path, obj, **kwargs) -> None:
    """``json.dumps(obj, **kwargs) + "\\n"`` to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def save_atomic(obj, path, save: Callable = None) -> None:
    """``torch.save(obj, path)`` atomically (``save(obj, file)`` if given, e.g. ``PIL.Image.save``
    through a lambda): a failed write raises one OSError naming ``path`` and the cause."""
    if save is None:
        import torch

        save = torch.save
    with atomic_write(path) as f:
        save(obj, f)
