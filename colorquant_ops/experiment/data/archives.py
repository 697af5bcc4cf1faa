"""The project's JPEG copy of CIFAR-10 (``../shared/data/cifar10-jpeg.tar.gz``): found, checked, extracted once."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Optional

from ..._io import atomic_write_text
from .cache import REPO_ROOT, default_cache_dir
from .folders import CIFAR10_CLASSES, DatasetNotFoundError, PathLike, class_dirs, is_dir

__all__ = ["CIFAR10_JPEG_ARCHIVE", "CIFAR10_JPEG_SHA256", "extract_cifar10_jpeg", "find_shared_cifar10_archive",
           "shared_archive_candidates"]

CIFAR10_JPEG_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"
CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"

_MARKER = ".extracted"


def shared_archive_candidates() -> list[Path]:
    candidates = []
    for base in (REPO_ROOT, Path.cwd()):
        path = (base.parent / "shared" / "data" / CIFAR10_JPEG_ARCHIVE).resolve()
        if path not in candidates:
            candidates.append(path)
    return candidates


def find_shared_cifar10_archive() -> Optional[Path]:
    """``../shared/data/cifar10-jpeg.tar.gz`` relative to the repository root or the current
    working directory, whichever exists first; ``None`` if neither does."""
    for path in shared_archive_candidates():
        if path.is_file():
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _only_files_and_dirs(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's ``data`` filter (nothing outside ``dest``, no absolute paths, no device nodes or
    FIFOs, links only inside ``dest``, no setuid / setgid / sticky bits, no group/other write), and
    beyond it: only regular files and directories."""
    member = tarfile.data_filter(member, dest)
    if not (member.isfile() or member.isdir()):
        raise tarfile.FilterError(f"{member.name!r} is a link or special file; only files and directories "
                                  "are extracted")
    return member


def _untar(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``: regular files and directories inside ``dest`` only,
    whatever the archive holds (a user's own archive too); anything else raises ValueError before
    it is created."""
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter=_only_files_and_dirs)
    except tarfile.FilterError as exc:
        raise ValueError(f"{archive}: refusing to extract it: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ValueError(f"{archive}: cannot extract it ({type(exc).__name__}: {exc})") from None


def _extracted(dest: Path) -> bool:
    marker = dest / _MARKER
    return marker.is_file() and marker.read_text().strip() == CIFAR10_JPEG_SHA256


def extract_cifar10_jpeg(archive: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> Path:
    """Extract the project's JPEG copy of CIFAR-10 once and return its directory (holding
    ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; pass it as ``data_root`` with name ``"cifar10"``).

    Args:
        archive: ``cifar10-jpeg.tar.gz``; default :func:`find_shared_cifar10_archive`.
        cache_dir: where to extract; default ``default_cache_dir() / "cifar10-jpeg"``
            (``<repo>/.cache/cifar10-jpeg``, git-ignored).

    Idempotent: a marker file written after a complete extraction makes later calls return at
    once (without needing the archive). The archive's sha256 is checked before extracting.

    Raises:
        DatasetNotFoundError: no archive (lists the paths looked at).
        ValueError: the archive's sha256 is not :data:`CIFAR10_JPEG_SHA256`.
    """
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "cifar10-jpeg"
    if _extracted(dest):
        return dest
    if archive is None:
        archive = find_shared_cifar10_archive()
        if archive is None:
            tried = shared_archive_candidates()
            raise DatasetNotFoundError(
                f"the CIFAR-10 JPEG archive {CIFAR10_JPEG_ARCHIVE} was not found; looked at:\n"
                + "".join(f"  {p}\n" for p in tried)
                + "pass archive=PATH, or run from a checkout next to shared/data/",
                tried,
            )
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise DatasetNotFoundError(f"the CIFAR-10 JPEG archive {archive} does not exist", [archive])
    digest = _sha256(archive)
    if digest != CIFAR10_JPEG_SHA256:
        raise ValueError(
            f"{archive} has sha256 {digest}, expected {CIFAR10_JPEG_SHA256} (shared/data/README.md): "
            "the file is corrupted or a different archive; not extracting it"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    # Extract beside dest and move it into place in one step; an existing dest without the
    # marker (an interrupted extraction) is extracted over, deleting nothing.
    target = dest if dest.exists() else Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".partial-"))
    try:
        _untar(archive, target)
        for split in ("train", "test"):
            classes = class_dirs(target / split) if is_dir(target / split) else []
            if tuple(classes) != CIFAR10_CLASSES:
                raise RuntimeError(
                    f"{archive} did not extract CIFAR-10's class folders into {target / split}: {classes}"
                )
        atomic_write_text(target / _MARKER, CIFAR10_JPEG_SHA256 + "\n")
    except BaseException:
        if target != dest:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if target != dest:
        try:
            os.rename(target, dest)
        except OSError:  # another process finished first
            shutil.rmtree(target, ignore_errors=True)
            if not _extracted(dest):
                raise
    return dest
