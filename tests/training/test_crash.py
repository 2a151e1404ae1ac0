"""Real crashes: the CLI is killed with SIGKILL (once mid-checkpoint-write) and resumed each time, and stopped
with SIGTERM; the final adapter equals an uninterrupted run's, and no partial checkpoint is ever resumed from.

Only the runs that are killed or stopped need a process of their own. The uninterrupted reference and the final
resume that finishes a run run in this process (`cli.main`, the same command): a process costs seconds of imports
before its first step, which was most of this file's time.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdlora.cli import main
from sdlora.formats import read_adapter
from sdlora.training.checkpoint import PAUSE_ENV, latest_checkpoint
from sdlora.training.interrupt import EXIT_STOPPED

STEPS = 8
COMMON = ["train.checkpoint_every=2", "train.keep_checkpoints=2", "lora.dropout=0.1", "data.crop=random",
          "data.random_flip=true", "train.lr_scheduler=cosine", "train.lr_warmup_steps=1"]


@pytest.fixture(scope="module")
def config_file(tiny_base, style_dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash") / "run.yaml"
    path.write_text(
        f"model: {{base: {tiny_base}}}\ndata: {{path: {style_dataset}, resolution: 64}}\n"
        f"train: {{steps: {STEPS}, batch_size: 2, learning_rate: 1.0e-3}}\n"
    )
    return path


def _launch(config: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.stderr", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "sdlora", "train", str(config), *COMMON, f"output.dir={out}", *extra],
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})},
    )


def _steps_logged(out: Path) -> int:
    try:
        return len((out / "train_log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out waiting for training"
        time.sleep(0.01)


def _partials(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return sorted(folder.glob(".step-*.partial")) if folder.is_dir() else []


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return read_adapter(out / "pytorch_lora_weights.safetensors").tensors["unet"]


def _train_here(config: Path, out: Path, *extra: str) -> int:
    """The command `_launch` runs, in this process: for runs nobody kills."""
    return main(["train", str(config), *COMMON, f"output.dir={out}", *extra])


@pytest.fixture(scope="module")
def reference(config_file) -> dict[str, torch.Tensor]:
    out = config_file.parent / "straight"
    assert _train_here(config_file, out) == 0
    return _adapter(out)


def _resumed_from(text: str) -> list[str]:
    return re.findall(r"resumed from \S*/(step-\d+|\.step[^ ]*) at step", text)


def test_sigkill_at_random_steps_then_resume_gives_the_same_adapter(config_file, reference, caplog):
    """Killed between checkpoints, then mid-checkpoint-write; the resume from what the kills left ends equal."""
    _kill_twice_or_three_times_then_finish(config_file, reference, caplog, "killed", another_random_kill=False)


@pytest.mark.slow
def test_sigkill_three_times_then_resume_gives_the_same_adapter(config_file, reference, caplog):
    """The same with a third kill at a random later step, after a resume from a checkpoint next to a partial one."""
    _kill_twice_or_three_times_then_finish(config_file, reference, caplog, "killed-thrice", another_random_kill=True)


def _kill_twice_or_three_times_then_finish(config_file, reference, caplog, name: str, another_random_kill: bool):
    out = config_file.parent / name
    rng = random.Random(os.environ.get("SDLORA_CRASH_SEED", "10"))
    first_kill, last_kill = rng.randint(3, 4), rng.randint(6, STEPS - 1)
    expected_resumes = []

    # 1: killed at a random step (after the step-2 checkpoint, maybe between checkpoints)
    proc = _launch(config_file, out)
    _wait_for(proc, lambda: _steps_logged(out) >= first_kill)
    _kill(proc)

    # 2: resumed, then killed in the middle of writing its first checkpoint
    expected_resumes.append(latest_checkpoint(out / "checkpoints").name)
    # A kill that landed mid-write above may have left a partial already: wait for one made by this process.
    earlier = set(_partials(out))
    proc = _launch(config_file, out, "--resume", "latest", env={PAUSE_ENV: "600"})
    _wait_for(proc, lambda: bool(set(_partials(out)) - earlier))
    _kill(proc)
    assert _partials(out), "the kill landed after the checkpoint was renamed into place"

    # 3: resumed from the last complete checkpoint (never the partial one), killed at a random later step
    if another_random_kill:
        expected_resumes.append(latest_checkpoint(out / "checkpoints").name)
        proc = _launch(config_file, out, "--resume", "latest")
        _wait_for(proc, lambda: _steps_logged(out) >= last_kill)
        _kill(proc)

    # 4: resumed to the end (from the last complete checkpoint, never a partial one), from what the kills left
    expected_resumes.append(latest_checkpoint(out / "checkpoints").name)
    with caplog.at_level("INFO", logger="sdlora"):
        assert _train_here(config_file, out, "--resume", "latest") == 0

    killed_runs = (out.parent / f"{out.name}.stderr").read_text()
    assert _resumed_from(killed_runs) + _resumed_from(caplog.text) == expected_resumes
    assert not _partials(out), "a partial checkpoint outlived the next successful save"
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(
        range(1, STEPS + 1)
    )
    resumed = _adapter(out)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key


def test_sigterm_writes_a_checkpoint_and_exits_with_the_resume_command(config_file, reference):
    out = config_file.parent / "terminated"
    proc = _launch(config_file, out, "train.checkpoint_every=0")
    _wait_for(proc, lambda: _steps_logged(out) >= 2)
    proc.send_signal(signal.SIGTERM)
    seen = _steps_logged(out)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_STOPPED
    stopped = latest_checkpoint(out / "checkpoints")
    assert stopped is not None
    step = int(stopped.name.split("-")[1])
    assert seen <= step <= seen + 1, (seen, step)  # within the step that was running
    assert f"stopped by SIGTERM at step {step}" in stdout and "--resume latest" in stdout

    assert _train_here(config_file, out, "train.checkpoint_every=0", "--resume", "latest") == 0
    resumed = _adapter(out)
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6, rtol=0), key
