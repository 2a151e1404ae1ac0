"""scripts/train_base.py (the shipped `sdlora:shapes` base) stops and goes on: a resumed run ends with exactly the
model an uninterrupted run makes. Tiny sizes; the real run takes over an hour of CPU."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "32", "--batch", "4", "--vae-steps", "3", "--vae-crop", "16", "--unet-steps", "6", "--pool", "256",
        "--unet-channels", "32", "32", "32", "--text-hidden", "32", "--save-every", "3", "--fp32"]


def train_base(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["train_base.py", *args])
    runpy.run_path(str(ROOT / "scripts" / "train_base.py"), run_name="__main__")


def weights(folder: Path) -> dict:
    return {part: load_file(next((folder / part).glob("*.safetensors"))) for part in ("unet", "text_encoder", "vae")}


def test_a_resumed_run_ends_with_the_model_of_an_uninterrupted_run_and_other_settings_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    train_base(monkeypatch, "--out", str(out), *TINY)
    straight = weights(out)
    state = out.with_name("shapes-state")
    assert (state / "vae.safetensors").is_file() and (state / "unet.safetensors").is_file()

    # The state on disk is the one written at UNet step 3 of 6: resuming redoes steps 4-6 from it.
    train_base(monkeypatch, "--out", str(out), *TINY, "--resume")
    resumed = weights(out)
    for part, tensors in straight.items():
        assert tensors.keys() == resumed[part].keys()
        assert all((tensors[k] == resumed[part][k]).all() for k in tensors), part
    assert "resumed at unet step 3" in out.with_name("shapes-train.log").read_text()
    record = json.loads((out / "training.json").read_text())
    assert record["resumed_at_unet_step"] == 3 and str(tmp_path) not in json.dumps(record)

    # Resuming with other settings would mix two runs: refused before anything is trained or written.
    with pytest.raises(SystemExit, match="made with other arguments"):
        train_base(monkeypatch, "--out", str(out), *TINY[:-1], "--unet-lr", "1e-3", "--fp32", "--resume")

