"""One run per output folder: a lock on `<output.dir>/.sdlora.lock`, which also records the owner's PID.

Two runs writing into the same folder would interleave checkpoints, rotate each other's files away and overwrite
each other's adapter. The lock is an exclusive `flock` on the lock file: the kernel drops it when its process dies,
however it dies (SIGKILL, OOM killer, power loss), so a lock file left by a dead run is stale by construction and is
taken over with a warning; a crashed run can always be resumed. The PID inside is for the error message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from sdlora.errors import UserError
from sdlora.files.atomic import DiskFullError, is_disk_full
from sdlora.training.folder import LOCK_NAME

log = logging.getLogger(__name__)


class OutputLockedError(UserError, RuntimeError):
    """Another live run owns the output folder."""


class OutputLock:
    """`with OutputLock(folder):` holds the folder for this process."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"output.dir {self.folder} is in use by another sdlora run (PID {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, started {owner.get('started', '?')}). Wait for it to finish, stop "
                    "it, or choose another output.dir"
                ) from None
            # The holder we waited on may have unlinked the file on release: then we locked an orphan inode.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        if previous.get("pid") not in (None, os.getpid()):
            log.warning("%s: taking over a stale lock left by PID %s, which is no longer running",
                        self.path, previous["pid"])
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # leave no lock file behind
            os.close(fd)
            if is_disk_full(exc):
                raise DiskFullError(f"{self.path}: the disk is full; not even the run's lock could be written",
                                    self.path) from None
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, ValueError):
        return {}  # empty (just created) or half-written by a run that died mid-write
    return owner if isinstance(owner, dict) else {}
