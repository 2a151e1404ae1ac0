"""Training runs started from the UI: each is a separate `python -m sdlora train` process in its own session, so
closing the page or killing the UI loses nothing, and the run list is read back from the run folders themselves
(a restarted UI finds running and finished runs again). The UI never trains in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import RunConfig, dump_config
from sdlora.errors import UserError
from sdlora.files.atomic import write_text_atomic
from sdlora.training.folder import RunFolder

STATE = "ui_run.json"  # which process trains this folder; written by the UI when it starts one
CONFIG = "ui_config.yaml"  # the config the UI handed to `sdlora train`
OUTPUT = "ui_train.log"  # the training process's stdout and stderr
LAUNCHED = "=== sdlora ui launched: "  # the line each launch appends to OUTPUT before the process's own lines

_children: dict[int, subprocess.Popen] = {}  # processes this UI started: polled so they never linger as zombies


class RunStateError(UserError, RuntimeError):
    """A run cannot be started, stopped or resumed as asked (already running, not running, nothing to resume)."""


@dataclass(frozen=True)
class RunInfo:
    folder: Path
    status: str  # running | finished | stopped | failed | new
    step: int
    steps: int
    pid: int | None

    @property
    def label(self) -> str:
        return f"{self.folder.name}: {self.status}, step {self.step}/{self.steps}"


def alive(pid: int | None) -> bool:
    """True while `pid` is a live (not zombie) sdlora process; a recycled pid of another program is not ours."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence is all we can tell
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and b"sdlora" in cmdline


def training_threads(runs_root: Path, cpus: int | None = None) -> int:
    """Threads for one new training process: the cores shared with the runs already training under `runs_root`
    (this UI's or an earlier one's), so two torch processes never each take every core (on 2 cores that made both
    about 5x slower per step)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // (1 + len(training(runs_root))))


def training(runs_root: Path) -> list[RunInfo]:
    return [run for run in list_runs(runs_root) if run.status == "running"]


def _state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_log(folder: str | Path) -> list[dict]:
    """The run's train_log.jsonl (one dict per step); a line still being written is skipped."""
    path = RunFolder(Path(folder)).step_log
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def samples(folder: str | Path) -> list[Path]:
    return sorted(RunFolder(Path(folder)).samples.glob("*.png"))


def info(folder: str | Path) -> RunInfo:
    folder = Path(folder)
    state = _state(folder)
    rows = read_log(folder)
    step = max((r.get("step", 0) for r in rows), default=0)
    pid = state.get("pid")
    output = (folder / OUTPUT).read_text(encoding="utf-8", errors="replace") if (folder / OUTPUT).is_file() else ""
    output = output.rsplit(LAUNCHED, 1)[-1]  # only the latest process's lines say how it ended
    if alive(pid):
        status = "running"
    elif "stopped by" in output:
        status = "stopped"
    elif "adapter:" in output or (not state and any(folder.glob("*.safetensors"))):
        status = "finished"
    elif state or output:
        status = "failed"
    else:
        status = "new"
    return RunInfo(folder, status, step, int(state.get("steps", 0)), pid if status == "running" else None)


def list_runs(runs_root: Path) -> list[RunInfo]:
    """Every run folder under `runs_root` (one level), newest first: what a restarted UI shows."""
    if not runs_root.is_dir():
        return []
    folders = [p for p in runs_root.iterdir() if p.is_dir() and ((p / STATE).is_file() or RunFolder(p).config.is_file())]
    return [info(p) for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]


def start(config: RunConfig, runs_root: Path, resume: bool = False) -> RunInfo:
    """Write the config into its run folder and start `python -m sdlora train` on it, detached."""
    folder = Path(config.output.dir)
    if info(folder).status == "running":
        raise RunStateError(f"{folder}: a run is already training there; stop it first or choose another output.dir")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / CONFIG, dump_config(config))
    return _launch(folder, config.train.steps, resume)


def resume(folder: str | Path) -> RunInfo:
    folder = Path(folder)
    run = info(folder)
    if run.status == "running":
        raise RunStateError(f"{folder}: still training; nothing to resume")
    if not (folder / CONFIG).is_file() or not RunFolder(folder).checkpoints.is_dir():
        raise RunStateError(f"{folder}: no checkpoint to resume from; start the run again instead")
    return _launch(folder, run.steps, resume=True)


def _launch(folder: Path, steps: int, resume: bool) -> RunInfo:
    command = [sys.executable, "-m", "sdlora", "train", str(folder / CONFIG), *(["--resume", "latest"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(training_threads(folder.parent)), "PYTHONUNBUFFERED": "1"}
    with open(folder / OUTPUT, "a", encoding="utf-8") as output:
        output.write(f"{LAUNCHED}{' '.join(command)}\n")
        output.flush()
        # Its own session: a Ctrl-C or a kill of the UI's process group never reaches the training.
        child = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    _children[child.pid] = child
    write_text_atomic(folder / STATE, json.dumps({"pid": child.pid, "command": command, "steps": steps,
                                                  "started": time.time()}))
    return info(folder)


def stop(folder: str | Path) -> RunInfo:
    """Ask the run to stop: SIGTERM, which sdlora turns into finishing the step and writing a checkpoint."""
    run = info(folder)
    if run.status != "running":
        raise RunStateError(f"{folder}: not training (it is {run.status})")
    os.kill(run.pid, signal.SIGTERM)
    return run


def eta_seconds(folder: str | Path) -> float | None:
    """Seconds left at the pace of this process so far (None before its first step)."""
    state, rows = _state(Path(folder)), read_log(folder)
    if not rows or not state.get("started"):
        return None
    first = rows[0].get("step", 1)
    done = rows[-1].get("step", 0) - first + 1
    left = state.get("steps", 0) - rows[-1].get("step", 0)
    return (time.time() - state["started"]) / max(done, 1) * max(left, 0)
