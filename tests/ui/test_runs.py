"""The run queue: one training at a time. A run started while another trains waits (no process is started for it)
and starts when that one ends; Stop takes a queued run off the queue. The first "training" here is a stand-in
process, so the test costs no training; the queued one is started for real by `runs.advance` and then ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from sdlora.config import validate_config
from sdlora.ui import runs


def _config(folder):
    return validate_config({"model": {"base": "sdlora:tiny"}, "data": {"resolution": 64}, "train": {"steps": 3},
                            "output": {"dir": str(folder)}})


def test_a_second_run_waits_until_the_first_ends_and_stop_takes_one_off_the_queue(tmp_path):
    root = tmp_path / "runs"
    (root / "first").mkdir(parents=True)
    # Stands in for a training started earlier (by this UI or another): an sdlora process recorded in its folder.
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "sdlora-stand-in"])
    started = []
    try:
        (root / "first" / runs.STATE).write_text(json.dumps({"pid": stand_in.pid, "steps": 5, "started": time.time()}))
        assert runs.info(root / "first").status == "running"

        second = runs.start(_config(root / "second"), root)
        third = runs.start(_config(root / "third"), root)
        assert (second.status, third.status) == ("queued", "queued") and second.pid is None
        assert "pid" not in json.loads((root / "second" / runs.STATE).read_text())  # nothing was started for it
        assert [r.folder.name for r in runs.queued(root)] == ["second", "third"]  # first queued, first served
        assert runs.advance(root) is None  # the first still trains

        assert runs.stop(root / "third").status == "cancelled"
        assert [r.folder.name for r in runs.queued(root)] == ["second"]

        stand_in.send_signal(signal.SIGTERM)
        stand_in.wait(10)
        launched = runs.advance(root)  # the first has ended: the queue moves on
        started.append(launched.pid)
        assert launched.folder == root / "second" and launched.status == "running"
        state = json.loads((root / "second" / runs.STATE).read_text())
        assert state["command"][-2:] == ["train", str(root / "second" / runs.CONFIG)] and state["pid"] == launched.pid
        assert runs.advance(root) is None and runs.info(root / "third").status == "cancelled"  # never started
    finally:
        stand_in.kill()
        for pid in started:
            os.kill(pid, signal.SIGKILL)
