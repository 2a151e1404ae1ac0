"""`train_log.jsonl`: one JSON line per optimizer step (step, loss, lr; skipped steps have loss null; a step that
was validated also has val_loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sdlora.files.atomic import write_text_atomic


def append_step(path: Path, step: int, loss: float, lr: float, extra: dict[str, float] | None = None) -> None:
    entry = {"step": step, "loss": loss, "lr": lr, **(extra or {})}
    if not math.isfinite(loss):  # skipped; NaN is not JSON
        entry.update(loss=None, skipped=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


def truncate(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


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
