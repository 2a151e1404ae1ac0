"""The run folder (`output.dir`): the one place that names the files a run writes there.

Training writes these, resuming reads them back, and the model card and `push` publish them; each of those asks
`RunFolder` for a path instead of spelling the name itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".sdlora.lock"  # holds the folder for one live run (`training/lock.py`)


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        """The validated config the run trained with (what `--resume` and the model card read)."""
        return self.root / "config.yaml"

    @property
    def step_log(self) -> Path:
        """One JSON line per optimizer step (`training/steplog.py`)."""
        return self.root / "train_log.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def cache(self) -> Path:
        """Latent and text caches, when `data.cache_dir` does not put them elsewhere."""
        return self.root / "cache"

    @property
    def card(self) -> Path:
        """The model card; the Hub shows a repository's README.md as its page."""
        return self.root / "README.md"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    def adapter(self, name: str) -> Path:
        """The diffusers/peft adapter file (`output.name`)."""
        return self.root / f"{name}.safetensors"

    def kohya_adapter(self, name: str) -> Path:
        """The same adapter in kohya / A1111 / ComfyUI key names (`output.kohya`)."""
        return self.root / f"{name}_kohya.safetensors"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:06d}.png"
