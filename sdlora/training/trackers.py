"""Live logs for TensorBoard: the step's loss and learning rate, the validation loss, and the sample grids.

`train_log.jsonl` stays the record of a run; these event files are a view of it that TensorBoard draws as it
trains (`tensorboard --logdir RUN/logs`). TensorBoard is optional: it is imported only when `logging.tensorboard`
is set, and a run that asks for it without it installed stops before any model loads, with the command to fix it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.config import ConfigError

INSTALL = "pip install tensorboard"


def require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"logging.tensorboard: the tensorboard package is not installed: {INSTALL}, or set "
                             "logging.tensorboard=false")


class TensorBoardTracker:
    """One run's event files. `first_step`: the first step this process will log; events an earlier (killed or
    rolled-back) process wrote from that step on are dropped by TensorBoard's readers (purge_step), so a resumed
    run's curves show each step once."""

    def __init__(self, log_dir: Path, first_step: int):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        # Flushed every 10 s (not torch's 120 s): the point of a live log is to see the run while it trains.
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step if first_step > 1 else None, flush_secs=10)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, path: Path) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
