"""Issue 17, case 1 and the lock of case 6: a run never adopts, resumes or rotates away another run's files, and a
run that fails before training leaves no lock behind.

The scenario as reported: an older run trained to its last checkpoint in output.dir; a new run with another learning
rate was started in the same folder, killed at step 6 and resumed with `--resume latest`, which used to continue
from the *old* run's newest checkpoint and write the old adapter under the new run's metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from sdlora.cli import main
from sdlora.data.sources import ImageRecord
from sdlora.formats import read_adapter
from sdlora.training import checkpoint, ownership
from sdlora.training.hooks import RunHooks
from sdlora.training.interrupt import EXIT_ABORTED
from sdlora.training.lock import LOCK_NAME, OutputLock
from sdlora.training.run import TrainingRun

STEPS = 10
COMMON = ["data.resolution=64", "train.batch_size=2", f"train.steps={STEPS}", "lora.dropout=0.1",
          "data.random_flip=true"]


def _train(capsys, config: Path, out: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["train", str(config), *COMMON, f"output.dir={out}", *extra])
    return code, capsys.readouterr().err


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("sdlora: error:")]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content hash: what "nothing previously written was damaged" compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return read_adapter(out / "pytorch_lora_weights.safetensors").tensors["unet"]


@pytest.fixture
def config_file(tmp_path, tiny_base, style_dataset) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{base: {tiny_base}}}\ndata: {{path: {style_dataset}}}\n")
    return path


def test_a_new_run_never_adopts_or_resumes_another_runs_checkpoints(capsys, caplog, config_file, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "out"
    # The older run: lr 1e-3, checkpoints at steps 5 and 10, which sort after anything the new run writes.
    code, _ = _train(capsys, config_file, out, "train.learning_rate=1e-3", "train.checkpoint_every=5")
    assert code == 0
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000005", "step-000010"]
    old = _snapshot(out)

    # A new run with another learning rate is refused: one line, exit 2, the old run's files untouched.
    new = ["train.learning_rate=5e-4", "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    code, err = _train(capsys, config_file, out, *new)
    [line] = _error_lines(err)
    assert code == 2 and f"output.dir {out} holds another run's files" in line
    assert "--resume latest" in line and "--overwrite" in line
    assert _snapshot(out) == old
    assert not (out / LOCK_NAME).exists()  # refused after the lock was taken: released at once

    # Resuming the old run with the new learning rate is refused, naming the field and both values.
    code, err = _train(capsys, config_file, out, *new, "--resume", "latest")
    [line] = _error_lines(err)
    assert code == 2 and "step-000010: this checkpoint was written by a run with other settings" in line
    assert "train.learning_rate (0.001 in the checkpoint, 0.0005 now)" in line
    assert _snapshot(out) == old

    # Told to overwrite, the new run deletes the old one's files before training; killed at step 6 (a second
    # Ctrl-C: no checkpoint for the step in flight), its rotation kept its own two newest checkpoints.
    after_step = RunHooks.after_step

    def killed_at_6(hooks, step, loss, lr, grad_norm=None):
        after_step(hooks, step, loss, lr, grad_norm)
        if step == 6:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(RunHooks, "after_step", killed_at_6)
        code, _ = _train(capsys, config_file, out, *new, "--overwrite")
    assert code == EXIT_ABORTED
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000004", "step-000006"]
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # the old adapter went with --overwrite

    with caplog.at_level("INFO"):
        code, _ = _train(capsys, config_file, out, *new, "--resume", "latest")
    assert code == 0
    assert re.search(r"resumed from \S*step-000006 at step 6", caplog.text)
    metadata = json.loads(read_adapter(out / "pytorch_lora_weights.safetensors").metadata["sdlora.training_config"])
    assert metadata["train"]["learning_rate"] == 5e-4

    # The resumed adapter is the new run's, bit for bit as if it had never been stopped.
    code, _ = _train(capsys, config_file, tmp_path / "straight", *new)
    assert code == 0
    resumed, straight = _adapter(out), _adapter(tmp_path / "straight")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_the_fingerprint_names_what_changed_and_ignores_what_does_not(make_config):
    records = [ImageRecord(Path(f"/data/{i}.png"), f"caption {i}", content_hash=f"h{i}") for i in range(3)]
    base = ownership.fingerprint(make_config(), records)
    # Where files go, how long to train, the batch layout and where the data lives may change on a resume.
    moved = [ImageRecord(Path(f"/elsewhere/{i}.png"), f"caption {i}", content_hash=f"h{i}") for i in range(3)]
    same = ownership.fingerprint(make_config("train.steps=50", "train.checkpoint_every=7", "train.batch_size=1",
                                             "output.dir=/other", "sample.every=3", "data.path=/moved",
                                             "logging.tensorboard=true", "train.distributed_timeout=60"), moved)
    assert ownership.differences(base, same) == []
    recaptioned = [*records[:2], ImageRecord(Path("/data/2.png"), "a new caption", content_hash="h2")]
    changed = ownership.fingerprint(make_config("lora.rank=8", "train.seed=1"), recaptioned)
    assert ownership.differences(base, changed) == [
        "lora.rank (4 in the checkpoint, 8 now)", "train.seed (42 in the checkpoint, 1 now)",
        "the dataset's captions",
    ]
    assert ownership.differences(base, ownership.fingerprint(make_config(), records[:2])) == [
        "the dataset (3 images in the checkpoint, 2 now)"]


def _state(step: int, run_id: str) -> checkpoint.TrainingState:
    return checkpoint.TrainingState(step=step, micro_step=step, trainable={"w": torch.full((2,), float(step))},
                                    optimizer={}, lr_scheduler={}, scaler=None, rng={}, extra={},
                                    run={"run_id": run_id})


def test_rotation_only_deletes_the_runs_own_checkpoints(tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoint.save_checkpoint(folder, _state(40, "older run"), keep=2)
    for step in (2, 4, 6):
        checkpoint.save_checkpoint(folder, _state(step, "this run"), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == ["step-000004", "step-000006", "step-000040"]
    assert checkpoint.read_run(folder / "step-000040") == {"run_id": "older run"}


def test_a_run_that_fails_before_training_releases_its_lock(make_config, tmp_path, caplog):
    empty = tmp_path / "no-images"
    empty.mkdir()
    run = TrainingRun(make_config(f"data.path={empty}"))
    with pytest.raises(Exception, match="no-images"):
        run.build()
    assert not (run.output_dir / LOCK_NAME).exists()
    with caplog.at_level("WARNING"), OutputLock(run.output_dir):  # free, and not called stale
        pass
    assert "stale lock" not in caplog.text
