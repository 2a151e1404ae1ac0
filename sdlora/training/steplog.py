"""`train_log.jsonl`: one JSON line per optimizer step (step, loss, lr; skipped steps have loss null; a step that
was validated also has val_loss).

A line is appended whole or not at all: a full disk mid-line cuts the file back to where the line began. A line
torn anyway (a power loss, a SIGKILL mid-write) is dropped when a resume reads the log back."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from sdlora.files.atomic import DiskFullError, is_disk_full, write_text_atomic

log = logging.getLogger(__name__)


def append_step(path: Path, step: int, loss: float, lr: float, extra: dict[str, float] | None = None) -> None:
    entry = {"step": step, "loss": loss, "lr": lr, **(extra or {})}
    if not math.isfinite(loss):  # skipped; NaN is not JSON
        entry.update(loss=None, skipped=True)
    data = (json.dumps(entry) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a write may stop short when the disk fills; the next one says why
                written += os.write(fd, data[written:])
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            os.ftruncate(fd, start)  # shrinking needs no space: the log ends on a whole line again
            raise DiskFullError(f"{path}: the disk filled up while logging step {step}; the log still ends on a "
                                "whole line", path) from None
    finally:
        os.close(fd)


def read_steps(path: Path) -> list[dict]:
    """The log's entries; a line that is not whole JSON (torn by a crash) is dropped with a warning."""
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            log.warning("%s: line %d is not a complete log entry (cut off by a crash or a full disk); dropped",
                        path, number)
            continue
        entries.append(entry)
    return entries


def truncate(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (a resume runs the later ones again)."""
    if not path.is_file():
        return
    kept = [entry for entry in read_steps(path) if entry["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(entry) + "\n" for entry in kept))


def join_segments(segments) -> list[float]:
    """Per-step losses of a run that rolled back: a later segment replaces the steps it ran again."""
    losses: list[float] = []
    first = segments[0].final_step - len(segments[0].losses)
    for segment in segments:
        start = segment.final_step - len(segment.losses)
        if start < first:
            losses, first = [], start
        del losses[start - first:]
        losses += segment.losses
    return losses
