"""How a generation from the UI and a training share the CPU: s/step of a run alone, then while the UI generates
over and over beside it (one thread, as the UI does while a run trains). Prints the numbers docs/ui.md records;
meaningful only on an otherwise idle machine, so it is a slow test run by hand."""

from __future__ import annotations

import threading
import time

import pytest

from sdlora.ui import form
from tests.ui.conftest import training_yaml, wait_for


def _step_times(log, first: int, last: int) -> float:
    """Seconds per step between steps `first` and `last`, timed by polling the run's train_log.jsonl."""
    seen = {}
    while last not in seen:
        lines = log.read_text().splitlines() if log.is_file() else []
        for number in range(1, len(lines) + 1):
            seen.setdefault(number, time.monotonic())
        time.sleep(0.1)
    return (seen[last] - seen[first]) / (last - first)


@pytest.mark.slow  # minutes of training on purpose; the numbers need an idle machine
def test_a_generation_beside_a_training_shares_the_cores(client, ui):
    config = training_yaml("cpu-share", 400, every=100000).replace("sample: {prompts: [a red circle, striped style], "
                                                                    "every: 100000, steps: 1}\n", "")
    client.predict("YAML", config, *[f.default for f in form.fields()], api_name="/start")
    log = ui.runs / "cpu-share" / "train_log.jsonl"
    wait_for(lambda: log.is_file(), 600, "the run's first step")
    alone = _step_times(log, 3, 13)
    stop, generations = threading.Event(), []

    def generate():
        while not stop.is_set():
            start = time.monotonic()
            client.predict("sdlora:tiny", "a red circle", 0, 20, 5.0, "", 0, "", *["", 1.0, 1.0] * 3,
                           api_name="/generate")
            generations.append(time.monotonic() - start)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    time.sleep(5)  # the first generation loads the base
    done = len(log.read_text().splitlines())
    beside = _step_times(log, done + 1, done + 11)
    stop.set()
    worker.join(300)
    client.predict(str(ui.runs / "cpu-share"), api_name="/stop")
    # Ended before the next test: a run still training would put that test's run in the queue.
    wait_for(lambda: "stopped" in client.predict(str(ui.runs / "cpu-share"), api_name="/watch")[0], 300,
             "the measured run to stop")
    print(f"\ntraining alone: {alone:.2f} s/step; beside generations: {beside:.2f} s/step "
          f"({beside / alone:.2f}x); generations of 20 steps beside it: "
          f"{', '.join(f'{g:.1f}' for g in generations)} s")
    assert beside < 3 * alone  # thrashing (two processes on every core) was about 5x
