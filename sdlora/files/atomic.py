"""Atomic file writes: a crash or a full disk never leaves a half-written file where a good one was."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from sdlora.errors import UserError


class DiskFullError(UserError, OSError):
    """Not enough free space for a write; nothing was changed. `path`: the file or folder that could not be written."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # OSError's own __str__ would print the args tuple
        return self.args[0]


def size_text(size: int) -> str:
    """Bytes as a person reads them: '54 KB', '3.2 MB', '1.4 GB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{max(1, round(size / 1e3))} KB"


# What a write needs beyond its own bytes: filesystem blocks are allocated whole (4 KiB on ext4, tmpfs, APFS), plus
# a margin for the folder entry and the filesystem's own bookkeeping.
BLOCK = 4096


def needed_on_disk(sizes: Iterable[int]) -> int:
    """Bytes a set of files takes on disk: each rounded up to whole blocks, plus 2% (at least one block) of slack."""
    total = sum(-(-size // BLOCK) * BLOCK for size in sizes)
    return total + max(BLOCK, total // 50)


def ensure_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse a write up front when the disk clearly cannot hold it. `needed_bytes` comes from the files themselves
    (`needed_on_disk`), so a small file is never refused on a disk that has room for it."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise DiskFullError(
            f"{folder}: not enough free space to write {what}: need about {size_text(needed_bytes)}, "
            f"{size_text(free)} free. Free some space or choose another output.dir", folder
        )


# safetensors (Rust) reports a full disk as `SafetensorError("... No space left on device (os error 28)")`, with no
# errno; other libraries wrap the OSError. Both are recognised by the text the OS gives the error.
_FULL_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"os error {errno.ENOSPC}",
               f"os error {errno.EDQUOT}")


def is_disk_full(exc: BaseException | None) -> bool:
    """A full disk (or quota) anywhere in `exc`: an OSError with ENOSPC/EDQUOT, a library error that says so, or
    either as the cause of another exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if not isinstance(exc, OSError) and any(text in str(exc) for text in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def discarded_on_failure(discard: Callable[[], None], disk_full_message: str,
                         path: str | Path | None = None) -> Iterator[None]:
    """Run `discard` (delete the partial output) if the block fails; a full disk becomes one `DiskFullError` that
    says what was kept, anything else propagates as it is."""
    try:
        yield
    except BaseException as exc:
        discard()
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(disk_full_message, path) from exc
        raise


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """The size of the safetensors file these tensors make: 8 bytes of header length, the JSON header (each
    tensor's name, dtype, shape and offsets, and the metadata), then the raw data."""
    header = {"__metadata__": metadata or {}}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": "BF16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return 8 + len(json.dumps(header, separators=(",", ":")).encode("utf-8")) + 8 + offset


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
        "file, if any, is unchanged. Free some space and try again", path,
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
    ensure_free_space(path.parent, needed_on_disk([safetensors_bytes(tensors, metadata)]), str(path))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
