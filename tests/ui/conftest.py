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


FAKE_TOKEN = "hf_sdloraUiFakeToken0123456789abcdefXYZ"  # must never appear on the page, in a log or a file


@dataclass
class UI:
    url: str
    port: int
    root: Path
    runs: Path
    process: subprocess.Popen
    output: list[str]  # what the UI process printed (its log), read as it runs

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """huggingface_hub in a UI process pointed at the test Hub, with a token in the environment (as a user's is)."""
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": FAKE_TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
           "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    return env


def start_ui(root: Path, runs: Path, port: int | None = None, timeout: float = 180,
             extra_env: dict[str, str] | None = None) -> UI:
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
    if extra_env and "HF_ENDPOINT" in extra_env:
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env.pop(proxy, None)
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
            # Keep reading its output (a full pipe would block the server); tests read it back.
            drain = __import__("threading").Thread(target=lambda: seen.extend(process.stdout), daemon=True)
            drain.start()
            return UI(line.split()[2], port, root, runs, process, seen)
    process.kill()
    raise AssertionError("sdlora ui did not start:\n" + "".join(seen))


def training_yaml(folder: str, steps: int, every: int = 2, name: str = "lora", validation: bool = False) -> str:
    """A run on the tiny base at 64 px that renders a 1-step sample every `every` steps: seconds, not minutes.
    With `validation`, a quarter of the images are held out and scored at the last step."""
    return (f"model: {{base: 'sdlora:tiny'}}\n"
            f"data: {{path: demo-style, resolution: 64}}\n"
            f"train: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-3, checkpoint_every: {every}}}\n"
            f"sample: {{prompts: [a red circle, striped style], every: {every}, steps: 1}}\n"
            + ("validation: {fraction: 0.25, timesteps: 2}\n" if validation else "")
            + f"output: {{dir: {folder}, name: {name}}}\n")


@pytest.fixture(scope="session")
def ui_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ui-root")
    shutil.copytree(REPO / "datasets" / "demo-style", root / "demo-style")
    return root


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py) that the session's UI pushes to."""
    from tests.hub_server import HubServer

    with HubServer() as server:
        yield server


@pytest.fixture(scope="session")
def ui(ui_root, tmp_path_factory, hub):
    """One UI for the session's API and browser tests (starting gradio costs seconds), with a Hub token in its
    environment and the test Hub as its endpoint."""
    need_gradio()
    app = start_ui(ui_root, tmp_path_factory.mktemp("ui-runs"),
                   extra_env=hub_env(hub.url, tmp_path_factory.mktemp("hf-home")))
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
