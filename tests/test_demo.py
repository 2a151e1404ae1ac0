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

# The demo as a user runs it, except that the style training's hook sends the demo (its parent process) a real
# SIGTERM after step 2 and waits for the stop request the demo forwards: the signal then lands mid-training on every
# machine, however fast, instead of after a guessed delay. The trainings are child processes, so the hook reaches
# them through a sitecustomize module on their PYTHONPATH.
SIGNAL_AT_STEP_2 = """
import os, signal, sys, time
if os.environ.get("DEMO_TEST_SIGNAL") and "train" in sys.argv:
    from sdlora.training import hooks
    after_step = hooks.RunHooks.after_step
    def after_step_then_signal(self, step, *rest, **named):
        after_step(self, step, *rest, **named)
        if step == 2 and self.run.config.output.name == "demo_style":
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(3)  # the demo forwards a stop request: it arrives here, before step 3
    hooks.RunHooks.after_step = after_step_then_signal
"""


def demo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "scripts/demo.py", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sigterm_stops_the_demo_after_a_checkpoint_and_a_rerun_resumes(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGNAL_AT_STEP_2)
    args = ["--out", str(tmp_path / "demo"), "--steps", "30", "--grid-steps", "2"]
    stopped = demo(*args, env={"DEMO_TEST_SIGNAL": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(hook)])})
    out = tmp_path / "demo"
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert "demo stopped by SIGTERM at step 2 of the style adapter, " in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert [p.name for p in (out / "style" / "checkpoints").iterdir()] == ["step-000002"]
    # The subject trains at the same time: it stopped too, unfinished: on a checkpoint, or (on a loaded machine,
    # still loading when the request came) before its first step, which the demo reports as a stop, not a failure.
    subject_checkpoints = [p.name for p in (out / "subject" / "checkpoints").glob("step-*")]
    assert "step-000030" not in subject_checkpoints
    assert ("the start of the subject adapter" in stopped.stderr) == (not subject_checkpoints)
    assert not list(out.glob("*.png"))  # no grid from a half-trained adapter
    assert (out / "style" / "train.log").read_text().count("SIGTERM received") == 1  # one stop request, not two

    resumed = demo(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[style] INFO sdlora.training.resume: resumed from" in resumed.stderr
    assert "at step 2" in resumed.stderr
    assert ("[subject] INFO sdlora.training.resume: resumed from" in resumed.stderr) == bool(subject_checkpoints)
    # Both end on a checkpoint of their last step, so a finished demo run again resumes there and trains nothing.
    assert (out / "style" / "checkpoints" / "step-000030").is_dir()
    assert (out / "subject" / "checkpoints" / "step-000030").is_dir()
    assert (out / "subject" / "demo_subject.safetensors").is_file()
    assert (out / "demo_grid.png").is_file() and (out / "demo_sweep.png").is_file()


FAIL_AT_STEP_2 = """
import os, sys
if os.environ.get("DEMO_TEST_FAIL") and "train" in sys.argv:
    from sdlora.errors import UserError
    from sdlora.training import hooks
    after_step = hooks.RunHooks.after_step
    def after_step_then_fail(self, step, *rest, **named):
        after_step(self, step, *rest, **named)
        if step == 2 and self.run.config.output.name == "demo_subject":
            raise UserError("data.path: an image became unreadable (test)")
    hooks.RunHooks.after_step = after_step_then_fail
"""


def test_a_failing_training_stops_the_other_and_the_demo_says_where_its_log_is(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_AT_STEP_2)
    out = tmp_path / "demo"
    failed = demo("--out", str(out), "--steps", "300", "--grid-steps", "2",
                  env={"DEMO_TEST_FAIL": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(hook)])})
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "[subject] sdlora: error: data.path: an image became unreadable (test)" in failed.stderr
    assert f"demo: error: the subject training failed (exit status 2); its log: {out / 'subject' / 'train.log'}" \
        in failed.stderr
    assert "Traceback" not in failed.stderr
    # The style training was stopped (on a checkpoint, or still loading), not left running for its 300 steps.
    assert "step-000300" not in failed.stderr  # no checkpoint of the style's last step: it never got there
    assert all(int(p.name.split("-")[1]) < 300 for p in (out / "style" / "checkpoints").glob("step-*"))
    assert not list(out.glob("*.png"))


def _demo_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_that_ends_first_is_announced_while_the_other_still_runs(tmp_path):
    # What lets the demo draw an adapter's own pictures on the core its finished training leaves free.
    demo_script = _demo_module()
    commands = {"style": [sys.executable, "-c", "import time; time.sleep(3)"], "subject": [sys.executable, "-c", ""]}
    announced = []
    trainings = demo_script.Trainings(commands, tmp_path)
    codes = trainings.wait(lambda name: announced.append((name, trainings.children["style"].poll())))
    assert codes == {"style": 0, "subject": 0}
    assert announced == [("subject", None)]  # only the subject, and while the style was still running


def test_the_pictures_drawn_early_are_exactly_those_without_the_other_adapter():
    pictures = _demo_module().Pictures()
    early, late = pictures.without_style, pictures.with_style
    assert {key[1] for key in early} == {0.0} and 0.0 not in {key[1] for key in late}
    every = {key for row in pictures.rows for key in row} | set(pictures.sweep)
    assert set(early) | set(late) == every and len(early) + len(late) == len(every) == 19
    # Whichever training ends first draws the pictures that need only its adapter: for the subject every picture
    # without the style (base, leak, subject columns, the sweep at 0); for the style the base, style and sweep
    # pictures; never a stacked one (both weights above 0), which waits for both.
    subject_only, style_only = pictures.needing_only("subject"), pictures.needing_only("style")
    assert subject_only == early
    assert {key[2] for key in style_only} == {0.0} and len(style_only) == 3 + 3 + 4  # base, style, the sweep below 1
    stacked = {key for key in every if key[1] and key[2]}
    assert len(stacked) == 3 and every - set(subject_only) - set(style_only) == stacked
