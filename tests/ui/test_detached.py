"""Killing the UI loses nothing: the training it started is its own process in its own session, and another UI
over the same runs folder finds it running (and can stop it gracefully, with a checkpoint)."""

from __future__ import annotations

import json
import os
import signal

import pytest

from sdlora.ui import form
from tests.ui.conftest import start_ui, training_yaml, wait_for

# Skipped, not an error, where the UI extra is not installed.
Client = pytest.importorskip("gradio_client", reason="pip install -e '.[ui-test]'").Client


@pytest.mark.slow  # a second gradio UI and a second training process: 88 s of the UI tests' 348 s on a loaded machine
def test_killing_the_ui_leaves_its_run_training_and_another_ui_finds_it(ui, client):
    first = start_ui(ui.root, ui.runs)
    try:
        other = Client(first.url, verbose=False)
        message, _ = other.predict("YAML", training_yaml("detached", 200, every=1000), *[f.default for f in form.fields()],
                                   api_name="/start")
        assert message.startswith("ok: started detached"), message
        folder = ui.runs / "detached"
        pid = json.loads((folder / "ui_run.json").read_text())["pid"]
        assert os.getsid(pid) == pid  # its own session: a signal to the UI's process group never reaches it
        wait_for(lambda: (folder / "train_log.jsonl").is_file(), 180, "the run's first step")
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.close()
    os.kill(pid, 0)  # still there
    progress = client.predict(str(folder), api_name="/watch")[0]
    assert progress.startswith("**detached: running, step "), progress
    assert client.predict(str(folder), api_name="/stop") == "ok: stop: detached"

    def stopped_line():
        line = client.predict(str(folder), api_name="/watch")[0]
        return line if "stopped" in line else None

    stopped = wait_for(stopped_line, 120, "the run to stop")
    step = int(stopped.split("step ")[1].split("/")[0])
    assert 0 < step < 200 and (folder / "checkpoints" / f"step-{step:06d}").is_dir()
