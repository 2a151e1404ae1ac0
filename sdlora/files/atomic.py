"""Atomic file writes: a crash or a full disk never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


@contextlib.contextmanager
def discarded_on_failure(discard: Callable[[], None], disk_full_message: str) -> Iterator[None]:
    """Run `discard` (delete the partial output) if the block fails; a full disk becomes one `DiskFullError` that
    says what was kept, anything else propagates as it is."""
    try:
        yield
    except BaseException as exc:
        discard()
        if is_disk_full(exc):
            raise DiskFullError(disk_full_message) from exc
        raise


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    with discarded_on_failure(
        lambda: tmp_path.unlink(missing_ok=True),
        f"{path}: the disk filled up while writing it; the half-written copy was deleted and the previous "
        "file, if any, is unchanged. Free some space and try again",
    ):
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    needed = tensor_bytes(tensors.values()) + 1_000_000
    ensure_free_space(path.parent, needed, str(path))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
