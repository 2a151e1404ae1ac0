"""Which run the run folder's files belong to, so a run never adopts, resumes or rotates away another run's work.

Every checkpoint carries a record of the run that wrote it (`checkpoint.RUN_FILE`): an id, and the fingerprint of
what decides the training, the config fields that change the numbers and the data (each image's content hash and
caption). `claim` runs before any model loads:

- a resume continues only from a checkpoint whose record matches this config and data, else it names the fields
  that differ; the resumed run keeps the checkpoint's id;
- a new run refuses a folder that holds another run's checkpoints or adapter, unless told to overwrite it (then
  those files are deleted first); it gets a new id.

Checkpoint rotation deletes only checkpoints with the run's own id (`checkpoint.save_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from sdlora.config import RunConfig
from sdlora.errors import UserError
from sdlora.training import checkpoint
from sdlora.training.folder import RunFolder

log = logging.getLogger(__name__)

# Config fields that do not change what is trained, or that a resume may change on purpose: where files go, samples
# and uploads, live logs (TensorBoard), the NaN policy, how long to wait for a lost machine, how long to train and
# how often to checkpoint, the batch layout (a resume on another number of processes maps the data position and says
# so), how the same numbers are computed, and where the data lives (the data itself is fingerprinted by content, so
# a moved dataset still resumes).
NOT_TRAINING = re.compile(
    r"^(output|sample|hub|safety|logging)\.|^train\.(steps|checkpoint_every|keep_checkpoints|batch_size"
    r"|gradient_accumulation|retain_host_memory|compile|attention|channels_last|gradient_checkpointing"
    r"|distributed_timeout)$|^data\.(path|num_workers"
    r"|cache_latents|cache_text_embeddings|cache_dir)$|^data\.sources\.\d+\.path$|^model\.allow_pickle$"
)


class RunFolderError(UserError, RuntimeError):
    """output.dir holds another run's checkpoints or adapter, and this run was not told to resume or overwrite."""


def _flat(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flat(item, f"{prefix}.{index}", out)
    else:
        out[prefix] = value
    return out


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(list(items)).encode("utf-8")).hexdigest()[:16]


def fingerprint(config: RunConfig, records) -> dict[str, Any]:
    """What decides the training: the config fields that change it, and the data in training order."""
    # Local paths by their final name only (`to_public_dict`): checkpoints may be pushed to the Hub.
    public = config.to_public_dict()
    fields = {key: value for key, value in _flat(public, "", {}).items() if not NOT_TRAINING.search(key)}
    data = {
        "images": len(records),
        "image_content": _digest(r.content_hash for r in records),
        "captions": _digest(r.caption for r in records),
        "repeats_and_weights": _digest((r.repeats, r.loss_weight) for r in records),
    }
    return {"config": fields, "data": data}


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each field or data aspect that differs, as 'name (X in the checkpoint, Y now)'. A field one side does not
    know (a newer or older sdlora) is not compared."""
    found = []
    old, new = recorded.get("config", {}), current["config"]
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key]:
            found.append(f"{key} ({old[key]!r} in the checkpoint, {new[key]!r} now)")
    old, new = recorded.get("data", {}), current["data"]
    if old.get("images") != new["images"]:
        found.append(f"the dataset ({old.get('images')} images in the checkpoint, {new['images']} now)")
    else:
        for key, what in (("image_content", "image files"), ("captions", "captions"),
                          ("repeats_and_weights", "repeats or loss weights")):
            if key in old and old[key] != new[key]:
                found.append(f"the dataset's {what}")
    return found


def previous_outputs(folder: RunFolder) -> list[Path]:
    """What a earlier run left that a new one must not mix with: checkpoints (complete or partial) and adapters."""
    found = []
    if folder.checkpoints.is_dir():
        found += sorted(p for p in folder.checkpoints.iterdir() if p.name.startswith(("step-", ".step-")))
    if folder.root.is_dir():
        found += sorted(folder.root.glob("*.safetensors"))
    return found


def _delete_previous(folder: RunFolder, found: list[Path]) -> None:
    log.warning("output.dir %s: deleting the previous run's files (--overwrite): %s", folder.root,
                ", ".join(str(p.relative_to(folder.root)) for p in found[:6]) + (", ..." if len(found) > 6 else ""))
    shutil.rmtree(folder.checkpoints, ignore_errors=True)
    shutil.rmtree(folder.samples, ignore_errors=True)
    for path in [*folder.root.glob("*.safetensors"), folder.config, folder.step_log, folder.card]:
        path.unlink(missing_ok=True)


def claim(folder: RunFolder, config: RunConfig, records, resume: str | None, overwrite: bool) -> dict[str, Any]:
    """Check that this run may use `folder` (see the module docstring); returns the run record its checkpoints
    carry. Call under the output lock: an overwrite deletes files."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: resume continues the run in output.dir, "
                             "overwrite deletes it; give one")
    current = fingerprint(config, records)
    if resume:
        path = checkpoint.latest_checkpoint(folder.checkpoints) if resume == "latest" else Path(resume)
        if path is None:
            raise checkpoint.CheckpointError(f"--resume latest: no complete checkpoint in {folder.checkpoints}")
        if not (path / checkpoint.STATE_FILE).is_file():
            raise checkpoint.CheckpointError(f"--resume {path}: not a complete checkpoint folder (no "
                                             f"{checkpoint.STATE_FILE}); give 'latest' or a checkpoints/step-N folder")
        recorded = checkpoint.read_run(path)
        if not recorded:
            log.warning("%s was written by an sdlora that did not record its run: cannot check that it was trained "
                        "with this config and data", path)
            return {**current, "run_id": uuid.uuid4().hex}
        found = differences(recorded, current)
        if found:
            raise checkpoint.CheckpointError(
                f"{path}: this checkpoint was written by a run with other settings: {'; '.join(found)}. Resume with "
                "the config and data it was trained with, start over with --overwrite, or choose another output.dir"
            )
        return {**current, "run_id": recorded["run_id"]}
    found = previous_outputs(folder)
    if found and not overwrite:
        shown = ", ".join(str(p.relative_to(folder.root)) for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise RunFolderError(
            f"output.dir {folder.root} holds another run's files ({shown}); a new run there would mix with them. "
            "Continue that run with --resume latest, start over with --overwrite (deletes them first), or choose "
            "another output.dir"
        )
    if found:
        _delete_previous(folder, found)
    return {**current, "run_id": uuid.uuid4().hex}
