"""Training runs started from the UI: each is a separate `python -m sdlora train` process in its own session, so
closing the page or killing the UI loses nothing, and the run list is read back from the run folders themselves
(a restarted UI finds running and finished runs again). The UI never trains in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
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

_queue_lock = threading.Lock()  # Start, the queue's thread and each page's poll may all try to launch at once
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
    elif state.get("queued"):
        status = "queued"
    elif state.get("cancelled"):
        status = "cancelled"
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


def start(config: RunConfig, runs_root: Path) -> RunInfo:
    """Write the config into its run folder and start `python -m sdlora train` on it, detached; or, while another
    run under `runs_root` trains, queue it (`advance` starts it when that one ends)."""
    folder = Path(config.output.dir)
    if info(folder).status in ("running", "queued"):
        raise RunStateError(f"{folder}: a run is already training or queued there; stop it first or choose another "
                            "output.dir")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / CONFIG, dump_config(config))
    return _launch_or_queue(folder, config.train.steps, resume=False)


def resume(folder: str | Path) -> RunInfo:
    folder = Path(folder)
    run = info(folder)
    if run.status in ("running", "queued"):
        raise RunStateError(f"{folder}: still {run.status}; nothing to resume")
    if not (folder / CONFIG).is_file() or not RunFolder(folder).checkpoints.is_dir():
        raise RunStateError(f"{folder}: no checkpoint to resume from; start the run again instead")
    return _launch_or_queue(folder, run.steps, resume=True)


def _launch_or_queue(folder: Path, steps: int, resume: bool) -> RunInfo:
    # One training at a time: two torch processes on one CPU (or one GPU) each run several times slower than one
    # alone, so the second waits in the queue instead of sharing the cores (see docs/ui.md for the measurement).
    with _queue_lock:
        if training(folder.parent) or queued(folder.parent):
            write_text_atomic(folder / STATE, json.dumps({"queued": time.time(), "steps": steps, "resume": resume}))
            return info(folder)
        return _launch(folder, steps, resume)


def queued(runs_root: Path) -> list[RunInfo]:
    """The runs waiting to train, first queued first."""
    waiting = [run for run in list_runs(runs_root) if run.status == "queued"]
    return sorted(waiting, key=lambda run: _state(run.folder).get("queued", 0))


def advance(runs_root: Path) -> RunInfo | None:
    """Start the first queued run when nothing under `runs_root` trains (the UI calls this every second, so the
    queue moves on even with no page open); returns the run started, if any."""
    with _queue_lock:
        if training(runs_root):
            return None
        waiting = queued(runs_root)
        if not waiting:
            return None
        state = _state(waiting[0].folder)
        return _launch(waiting[0].folder, int(state.get("steps", 0)), bool(state.get("resume")))


def _launch(folder: Path, steps: int, resume: bool) -> RunInfo:
    command = [sys.executable, "-m", "sdlora", "train", str(folder / CONFIG), *(["--resume", "latest"] if resume else [])]
    # PASSIVE: OpenMP threads that wait at a barrier sleep instead of spinning, so a generation the UI runs beside
    # the training (one thread) does not make every parallel region wait for a descheduled spinner (measured in
    # tests/ui/test_cpu_sharing.py: 19x slower steps without it).
    env = {**os.environ, "OMP_NUM_THREADS": str(training_threads(folder.parent)), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONUNBUFFERED": "1"}
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
    with _queue_lock:  # never cancelled while the queue starts it
        run = info(folder)
        if run.status == "queued":  # not started yet: it leaves the queue, and nothing else changes
            state = _state(run.folder)
            write_text_atomic(run.folder / STATE, json.dumps({"cancelled": time.time(),
                                                              "steps": state.get("steps", 0)}))
            return info(folder)
    if run.status != "running":
        raise RunStateError(f"{folder}: not training (it is {run.status})")
    os.kill(run.pid, signal.SIGTERM)
    return run


_first_seen: dict[Path, tuple[int, float]] = {}  # run folder -> (step, its time) when this UI first saw it train


def eta_seconds(folder: str | Path) -> float | None:
    """Seconds left at the pace of the steps this UI has watched (the log's modification time is when its last
    step ended), so the minutes a run spends loading its base do not count as steps; None until two steps."""
    folder = Path(folder)
    state, rows = _state(folder), read_log(folder)
    if not rows or not state.get("pid"):
        return None
    step, at = rows[-1].get("step", 0), RunFolder(folder).step_log.stat().st_mtime
    seen = _first_seen.get(folder)
    if seen is None or seen[1] < state.get("started", 0) or step < seen[0]:
        _first_seen[folder] = (step, at)  # first sight, or a resumed process: its pace is watched afresh
        return None
    first_step, first_at = seen
    if step == first_step:
        return None
    left = state.get("steps", 0) - step
    return (at - first_at) / (step - first_step) * max(left, 0)


def validates(folder: str | Path) -> bool:
    """Whether the run scores a held-out set (its config says so), before its first validation loss is logged."""
    from sdlora.config import ConfigError, load_config

    try:
        return load_config(Path(folder) / CONFIG).validates
    except (ConfigError, OSError):
        return False


def chart_rows(folder: str | Path) -> list[dict]:
    """The live chart's points from train_log.jsonl: (step, value, series) with series `train loss`, `validation
    loss` (the steps the run scored its held-out set) or `learning rate`; a skipped step (loss null) has none."""
    points = []
    for row in read_log(folder):
        for key, series in (("loss", "train loss"), ("val_loss", "validation loss"), ("lr", "learning rate")):
            if row.get(key) is not None:
                points.append({"step": row["step"], "value": row[key], "series": series})
    return points
