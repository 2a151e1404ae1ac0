"""A running `sdlora ui` for the UI's tests: a separate process (as a user starts it) over a temporary root holding a
copy of the bundled demo dataset (the repository's files are never edited) and a temporary runs folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"  # screenshots the browser test saves (ignored by git)



def need_gradio() -> None:
    pytest.importorskip("gradio", reason="the web UI needs gradio: pip install -e '.[ui-test]'")
    pytest.importorskip("gradio_client", reason="the UI's API tests need gradio_client: pip install -e '.[ui-test]'")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class UI:
    url: str
    port: int
    root: Path
    runs: Path
    process: subprocess.Popen

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_ui(root: Path, runs: Path, port: int | None = None, timeout: float = 180) -> UI:
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "sdlora", "ui", "--root", str(root), "--runs", str(runs),
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if line.startswith("sdlora ui: http://"):
            # Keep reading its output so a full pipe never blocks the server.
            drain = __import__("threading").Thread(target=lambda: [None for _ in process.stdout], daemon=True)
            drain.start()
            return UI(line.split()[2], port, root, runs, process)
    process.kill()
    raise AssertionError("sdlora ui did not start:\n" + "".join(seen))


def training_yaml(folder: str, steps: int, every: int = 2, name: str = "lora") -> str:
    """A run on the tiny base at 64 px that renders a 1-step sample every `every` steps: seconds, not minutes."""
    return (f"model: {{base: 'sdlora:tiny'}}\n"
            f"data: {{path: demo-style, resolution: 64}}\n"
            f"train: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-3, checkpoint_every: {every}}}\n"
            f"sample: {{prompts: [a red circle, striped style], every: {every}, steps: 1}}\n"
            f"output: {{dir: {folder}, name: {name}}}\n")


@pytest.fixture(scope="session")
def ui_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui-root")
    shutil.copytree(REPO / "datasets" / "demo-style", root / "demo-style")
    return root


@pytest.fixture(scope="session")
def ui(ui_root, tmp_path_factory):
    """One UI for the session's API and browser tests (starting gradio costs seconds)."""
    need_gradio()
    app = start_ui(ui_root, tmp_path_factory.mktemp("ui-runs"))
    yield app
    app.close()
    end_runs(app.runs)


def end_runs(runs_root: Path) -> None:
    """Kill every training a test started and left running (a failed test must not leave a process behind)."""
    import json

    from sdlora.ui.runs import alive

    for state in runs_root.glob("*/ui_run.json"):
        pid = json.loads(state.read_text()).get("pid")
        if alive(pid):
            os.kill(pid, 9)


@pytest.fixture(scope="session")
def client(ui):
    from gradio_client import Client

    return Client(ui.url, verbose=False)


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
