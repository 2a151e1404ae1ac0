"""Atomic file writes: a crash or a full disk never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from sdlora.errors import UserError


class DiskFullError(UserError, OSError):
    """Not enough free space for a write; nothing was changed."""


def ensure_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse a write up front when the disk clearly cannot hold it (10% headroom for filesystem overhead)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.1:
        raise DiskFullError(
            f"{folder}: not enough free space to write {what}: need about {needed_bytes / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free. Free some space or choose another output.dir"
        )


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"{path}: the disk filled up while writing it; the half-written copy was deleted and the previous "
                "file, if any, is unchanged. Free some space and try again"
            ) from exc
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 1_000_000
    ensure_free_space(path.parent, needed, str(path))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
