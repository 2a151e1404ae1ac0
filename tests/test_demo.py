"""scripts/demo.py: one Ctrl-C / SIGTERM stops the whole demo after a checkpoint, and a re-run resumes there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdlora.models import PACKAGED_BASES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (PACKAGED_BASES["sdlora:shapes"] / "model_index.json").is_file(),
                                reason="sdlora:shapes is not in this checkout (scripts/train_base.py makes it)")

# The demo as a user runs it, except that the style training's hook sends the process a real SIGTERM after step
# 2: the signal then lands mid-training on every machine, however fast, instead of after a guessed delay.
SIGNAL_AT_STEP_2 = """
import os, runpy, signal, sys
from sdlora.training import hooks
after_step = hooks.RunHooks.after_step
def after_step_then_signal(self, step, *rest, **named):
    after_step(self, step, *rest, **named)
    if step == 2 and self.run.config.output.name == "demo_style":
        os.kill(os.getpid(), signal.SIGTERM)
hooks.RunHooks.after_step = after_step_then_signal
sys.argv = ["scripts/demo.py", *sys.argv[1:]]
runpy.run_path("scripts/demo.py", run_name="__main__")
"""


def demo(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_sigterm_stops_the_demo_after_a_checkpoint_and_a_rerun_resumes(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "4", "--grid-steps", "2"]
    stopped = demo("-c", SIGNAL_AT_STEP_2, *args)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "demo stopped by SIGTERM at step 2 of the style adapter" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert [p.name for p in (tmp_path / "style" / "checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "subject").exists()  # the next training never started
    assert not list(tmp_path.glob("*.png"))  # no grid from a half-trained adapter

    resumed = demo("scripts/demo.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    assert "resumed from" not in resumed.stderr.split("demo_style.safetensors")[-1]  # the subject run is new
    # Both end on a checkpoint of their last step, so a finished demo run again resumes there and trains nothing.
    assert (tmp_path / "style" / "checkpoints" / "step-000004").is_dir()
    assert (tmp_path / "subject" / "checkpoints" / "step-000004").is_dir()
    assert (tmp_path / "subject" / "demo_subject.safetensors").is_file()
    assert (tmp_path / "demo_grid.png").is_file() and (tmp_path / "demo_sweep.png").is_file()
