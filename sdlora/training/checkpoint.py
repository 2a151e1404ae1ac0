"""Resumable training state: trainable weights, optimizer, LR schedule, step counters and every RNG.

Tensors go to safetensors, everything else to JSON: no pickle anywhere, so a checkpoint from someone else is safe
to open. A checkpoint is written into a temporary folder and renamed when complete, so an interrupted write is
never mistaken for a checkpoint; `latest_checkpoint` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdlora.errors import UserError
from sdlora.files.atomic import discarded_on_failure, ensure_free_space, needed_on_disk, safetensors_bytes
from sdlora.files.untrusted import validate_safetensors

CHECKPOINT_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "state.json"
RUN_FILE = "run.json"  # which run wrote the checkpoint: its id and fingerprint (`ownership.py`)
# Test hook (crash tests): seconds to sleep half-way through writing a checkpoint, so a SIGKILL can land there.
PAUSE_ENV = "SDLORA_TEST_CHECKPOINT_PAUSE"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue as if it had never stopped."""

    step: int
    micro_step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    extra: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)  # the writing run's record (`ownership.claim`)
    # State of the run's optional parts by name (e.g. the adapter EMA): nested dicts of tensors and JSON values.
    components: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Nested state dicts <-> (flat tensors, JSON skeleton)


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.copy())
        return {"__ndarray__": prefix}
    return obj


def _key(key: Any) -> Any:
    return {"__int__": key} if isinstance(key, int) else key


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {
                (k["__int__"] if isinstance(k, dict) else k): _join_tensors(v, tensors) for k, v in obj["__dict__"]
            }
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------------------
# Save / load


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(folder: Path, state: TrainingState, keep: int) -> Path:
    """Write `folder/step-NNNNNN/` atomically, then delete all but the newest `keep` checkpoints of this run (those
    whose run record has `state.run`'s id): a checkpoint some other run wrote is never rotated away."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {
        "step": state.step,
        "micro_step": state.micro_step,
        "optimizer": _split_tensors(state.optimizer, "optimizer", tensors),
        "lr_scheduler": _split_tensors(state.lr_scheduler, "lr_scheduler", tensors),
        "scaler": _split_tensors(state.scaler, "scaler", tensors),
        "rng": _split_tensors(state.rng, "rng", tensors),
        "extra": state.extra,
        "components": _split_tensors(state.components, "components", tensors),
    }
    trainable = {name: t.detach().cpu().contiguous() for name, t in state.trainable.items()}
    skeleton_text = json.dumps(skeleton, default=_jsonable)
    run_text = json.dumps(state.run)
    sizes = [safetensors_bytes(trainable), safetensors_bytes(tensors), len(skeleton_text), len(run_text)]
    ensure_free_space(folder, needed_on_disk(sizes), "a checkpoint")
    final = folder / checkpoint_name(state.step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=folder))
    with discarded_on_failure(
        lambda: shutil.rmtree(staging, ignore_errors=True),
        f"{final}: the disk filled up while writing this checkpoint; it was discarded and the previous "
        "checkpoints are unchanged", final,
    ):
        save_file(trainable, str(staging / "trainable.safetensors"))
        if os.environ.get(PAUSE_ENV):
            time.sleep(float(os.environ[PAUSE_ENV]))
        save_file(tensors, str(staging / "state.safetensors"))
        # The run record first: state.json marks a checkpoint complete (`list_checkpoints`), so it is written last.
        (staging / RUN_FILE).write_text(run_text, encoding="utf-8")
        (staging / STATE_FILE).write_text(skeleton_text, encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    remove_partials(folder)
    own = [path for path in list_checkpoints(folder) if read_run(path).get("run_id") == state.run.get("run_id")]
    for old in own[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_run(path: Path) -> dict[str, Any]:
    """The record of the run that wrote checkpoint `path`; {} for a checkpoint from before runs were recorded."""
    try:
        record = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which cannot be stored as JSON")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial (temporary) folders never match the name pattern."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_DIR.match(p.name).group(1)))


def remove_partials(folder: Path) -> None:
    """Delete staging folders left by a writer that was killed (SIGKILL, power loss). Only safe under the output
    lock, which guarantees no other writer is mid-way through one."""
    for stale in folder.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> TrainingState:
    try:
        validate_safetensors(path / "state.safetensors")
        validate_safetensors(path / "trainable.safetensors")
        skeleton = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(path / "state.safetensors"))
        trainable = load_file(str(path / "trainable.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc}") from None
    return TrainingState(
        step=skeleton["step"],
        micro_step=skeleton["micro_step"],
        trainable=trainable,
        optimizer=_join_tensors(skeleton["optimizer"], tensors),
        lr_scheduler=_join_tensors(skeleton["lr_scheduler"], tensors),
        scaler=_join_tensors(skeleton["scaler"], tensors),
        rng=_join_tensors(skeleton["rng"], tensors),
        extra=skeleton.get("extra", {}),
        run=read_run(path),
        components=_join_tensors(skeleton.get("components", {}), tensors),
    )
