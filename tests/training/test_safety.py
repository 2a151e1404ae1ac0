"""Output-folder lock, signal handling, full disks and non-finite numbers: nothing is lost or half-written."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from sdlora.files import atomic
from sdlora.formats import read_adapter
from sdlora.training import checkpoint, divergence
from sdlora.training.interrupt import GracefulStop
from sdlora.training.lock import LOCK_NAME, OutputLock, OutputLockedError
from sdlora.training.run import TrainingRun

# -- lock ------------------------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    with OutputLock(tmp_path / "run"):
        owner = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match=rf"in use by another sdlora run \(PID {os.getpid()}"):
            OutputLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with OutputLock(tmp_path / "run"):  # released: free again
        pass


def test_the_cli_refuses_a_locked_folder(tmp_path, tiny_base, style_dataset, capsys):
    """In this process: flock locks belong to an open file, so the command's own open meets the held lock just as
    another process's would (and the command costs no process start)."""
    from sdlora.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{base: {tiny_base}}}\ndata: {{path: {style_dataset}, resolution: 64}}\n"
                      f"output: {{dir: {tmp_path / 'out'}}}\n")
    capsys.readouterr()
    with OutputLock(tmp_path / "out"):
        code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "is in use by another sdlora run" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("sdlora: error:")]) == 1, err


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    with caplog.at_level("WARNING"), OutputLock(folder):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"stale lock left by PID {dead.pid}" in caplog.text


# -- signals ---------------------------------------------------------------------------------------------------


def test_first_signal_asks_to_stop_second_ctrl_c_raises():
    # A shell that starts pytest in the background leaves SIGINT ignored; start from Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.signal_name == "SIGTERM"
            with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


# -- disk ------------------------------------------------------------------------------------------------------


def _fill_disk_half_way(real_save):
    def save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # leave a half-written file, as a real ENOSPC would
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_a_full_disk_during_save_keeps_the_previous_adapter(make_config, monkeypatch):
    import safetensors.torch

    run = TrainingRun(make_config("train.steps=1"))
    run.build()
    result = run.fit()
    before = read_adapter(result.adapter_path).tensors["unet"]
    with torch.no_grad():
        for param in run.parts.params:
            param.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", _fill_disk_half_way(safetensors.torch.save_file))
    from sdlora import formats

    with pytest.raises(atomic.DiskFullError, match="disk filled up while writing it; the half-written copy"):
        formats.save_diffusers(result.adapter_path, run.adapter())
    after = read_adapter(result.adapter_path).tensors["unet"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in result.output_dir.iterdir() if p.name.startswith(".")) == []

    monkeypatch.setattr(checkpoint, "save_file", _fill_disk_half_way(safetensors.torch.save_file))
    with pytest.raises(atomic.DiskFullError, match="previous checkpoints are unchanged"):
        run.save_checkpoint(5)
    assert [p.name for p in (result.output_dir / "checkpoints").iterdir()] == []


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(atomic.DiskFullError, match="need about 8 KB, 1 KB free"):
        atomic.save_safetensors_atomic({"x": torch.zeros(4)}, tmp_path / "a.safetensors", {})
    assert list(tmp_path.iterdir()) == []


# -- numbers ---------------------------------------------------------------------------------------------------


def _log(run):
    return [json.loads(line) for line in (run.output_dir / "train_log.jsonl").read_text().splitlines()]


def test_a_run_of_infs_is_skipped_then_rolled_back_with_a_lower_lr(make_config):
    run = TrainingRun(make_config("train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=5"))
    run.build()
    pending = {2, 5, 6, 7}  # fire once each: after the rollback the same steps run clean

    def inject(step):
        if step in pending:
            pending.discard(step)
            return True
        return False

    run.parts.inject_inf = inject
    result = run.fit()
    assert run.guard.rollbacks == 1 and run.guard.skipped == 4
    assert run.parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    assert result.final_step == 8 and len(result.losses) == 8
    # step 2 was a lone skip (kept); 5..7 were replayed from the step-4 checkpoint, clean
    assert [i + 1 for i, loss in enumerate(result.losses) if not math.isfinite(loss)] == [2]
    log = _log(run)
    assert [e["step"] for e in log] == list(range(1, 9))
    assert [e["step"] for e in log if e.get("skipped")] == [2] and log[1]["loss"] is None
    assert log[3]["lr"] == pytest.approx(1e-3) and log[4]["lr"] == pytest.approx(0.5e-3)
    adapter = read_adapter(result.adapter_path).tensors["unet"]
    assert all(torch.isfinite(t).all() for t in adapter.values())
    saved = checkpoint.list_checkpoints(run.output_dir / "checkpoints")
    assert [p.name for p in saved] == ["step-000004", "step-000006", "step-000008"]  # none mid-streak
    for folder in saved:
        trainable = checkpoint.load_checkpoint(folder).trainable
        assert all(torch.isfinite(t).all() for t in trainable.values()), folder


def test_endless_infs_stop_with_a_diagnosis_and_write_no_adapter(make_config):
    run = TrainingRun(make_config("train.steps=6", "train.checkpoint_every=2", "safety.nan_max_rollbacks=1"))
    run.build()
    run.parts.inject_inf = lambda step: step >= 3
    with pytest.raises(divergence.NumericError) as caught:
        run.fit()
    message = str(caught.value)
    assert "training diverged: 3 steps in a row had a non-finite loss or gradient (steps 3..5)" in message
    assert "1 rollback(s) to the last good checkpoint did not help" in message
    assert "checkpoints/step-000002" in message and "train.learning_rate" in message
    assert not (run.output_dir / "pytorch_lora_weights.safetensors").exists()

    # never a NaN on disk: a poisoned weight makes every save refuse
    with torch.no_grad():
        run.parts.params[0].view(-1)[0] = float("nan")
    with pytest.raises(divergence.NumericError, match="refusing to write checkpoint at step 9: 1 tensor"):
        run.save_checkpoint(9)
    assert [p.name for p in checkpoint.list_checkpoints(run.output_dir / "checkpoints")] == ["step-000002"]


def test_no_checkpoint_means_stop_not_rollback(make_config):
    run = TrainingRun(make_config("train.steps=6", "safety.nan_patience=2"))
    run.build()
    with torch.no_grad():  # weights already broken: no step can fix that, so no patience either
        run.parts.params[0].view(-1)[0] = float("inf")
    with pytest.raises(divergence.NumericError, match="LoRA weights became NaN/inf at step 1; there is no checkpoint"):
        run.fit()
    assert not (run.output_dir / "pytorch_lora_weights.safetensors").exists()
