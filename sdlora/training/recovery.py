"""What a run stopped by a full disk says, in one line: what could not be written, what was kept, how much space to
free, and the command that continues the run (`--resume latest` from the last complete checkpoint; when the
checkpoint is at the final step, the resume trains nothing and only writes the files that are missing)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.files.atomic import DiskFullError, is_disk_full, needed_on_disk, size_text, tensor_bytes
from sdlora.training import checkpoint, distributed

if TYPE_CHECKING:
    from sdlora.training.lock import OutputLock
    from sdlora.training.run import TrainingRun


@contextlib.contextmanager
def guarded(run: TrainingRun, lock: OutputLock) -> Iterator[None]:
    """A failure releases the output lock at once (the next run must not find a lock it calls stale); a full disk
    anywhere (our own DiskFullError, an OSError, safetensors' SafetensorError) and a lost machine or process of a
    distributed run each become one line."""
    try:
        yield
    except BaseException as exc:
        lock.release()
        if is_disk_full(exc):
            raise DiskFullError(disk_full_line(exc, run), getattr(exc, "path", None)) from None
        if isinstance(exc, RuntimeError):  # a collective failed: one line if a machine or process was lost
            distributed.raise_if_peer_lost(exc, run.accelerator.num_processes, run.folder.checkpoints)
        raise


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def space_to_continue(run: TrainingRun, latest: Path | None) -> int:
    """Room for the rest of the run: a checkpoint (as big as the last one, or the LoRA weights and AdamW's two
    moments) and the adapter file(s)."""
    weights = tensor_bytes(run.parts.params) if run.parts is not None else 0
    ckpt = _bytes_under(latest) if latest is not None else 3 * weights
    adapters = weights * (2 if run.config.output.kohya else 1)
    return needed_on_disk([ckpt, adapters, 1_000_000])  # + 1 MB: the step log, config, card and a sample grid


def _what_failed(exc: BaseException, root: Path) -> str:
    # Our own messages end with generic advice ("Free some space and try again"); the run's advice replaces it.
    text = re.split(r"\. Free some space", str(exc))[0].rstrip(". ")
    if getattr(exc, "path", None) is None and getattr(exc, "filename", None) is None and str(root) not in text:
        text = f"{root}: the disk is full ({text})"
    elif getattr(exc, "filename", None) is not None and not getattr(exc, "path", None):
        text = f"{exc.filename}: the disk is full ({getattr(exc, 'strerror', None) or text})"
    return text


def disk_full_line(exc: BaseException, run: TrainingRun) -> str:
    folder, train = run.folder, run.config.train
    latest = checkpoint.latest_checkpoint(folder.checkpoints)
    need = f"at least {size_text(space_to_continue(run, latest))} in {folder.root}"
    if latest is not None:
        step = int(checkpoint.CHECKPOINT_DIR.match(latest.name).group(1))
        then = ("it trains nothing again and writes the files that are missing" if step >= train.steps
                else f"it continues from step {step}, ending as if never stopped")
        advice = (f"The last complete checkpoint, {latest}, is intact. Free {need} and run the same `sdlora train` "
                  f"command with --resume latest: {then}")
    elif folder.adapter(run.config.output.name).is_file():
        advice = (f"The adapter {folder.adapter(run.config.output.name)} is complete; only the files after it are "
                  f"missing. Free {need} to write them (`sdlora card {folder.root}` rebuilds the model card)")
    else:
        advice = (f"No checkpoint was written yet (train.checkpoint_every={train.checkpoint_every}). Free {need} "
                  "and run the same `sdlora train` command again")
    return f"{_what_failed(exc, folder.root)}. {advice}"
