"""The app's API without a browser (gradio_client against a running `sdlora ui`): open a dataset, edit a caption,
validate a config, train a few steps on the tiny base as a separate process, read its log, generate with its adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client.exceptions import AppError
from PIL import Image

from sdlora.ui import form
from tests.ui.conftest import training_yaml, wait_for


def _defaults():
    return [f.default for f in form.fields()]


def test_open_a_dataset_and_edit_one_caption(client, ui):
    gallery, status, problems, report = client.predict("demo-style", 64, api_name="/open_dataset")
    assert status == "24 images" and len(gallery) == 24
    assert gallery[0]["caption"] == (ui.root / "demo-style" / "000.txt").read_text().strip()
    assert "files found 24 (24 image(s), 0 other), usable 24" in report and problems["data"] == []
    image = ui.root / "demo-style" / "001.png"
    before = image.read_bytes()
    assert client.predict(str(image), "a new caption, striped style", api_name="/save_caption") == "ok: saved 001.txt"
    assert (ui.root / "demo-style" / "001.txt").read_text() == "a new caption, striped style\n"
    assert image.read_bytes() == before
    refused = client.predict("../", 64, api_name="/open_dataset")[1]
    assert refused.startswith("error: ../: '..' is not allowed")


def test_validation_errors_name_the_field(client):
    bad = client.predict("YAML", "train: {steps: -3}\n", *_defaults(), api_name="/validate")
    assert bad.startswith("error:") and "train.steps" in bad
    values = [(-3 if f.key == "train.steps" else f.default) for f in form.fields()]
    assert "train.steps" in client.predict("Form", "", *values, api_name="/validate")
    good = client.predict("YAML", training_yaml("api-check", 2), *_defaults(), api_name="/validate")
    assert good.startswith("ok: valid: 2 steps")


def test_a_run_trains_in_its_own_process_and_its_adapter_generates(client, ui):
    message, listing = client.predict("YAML", training_yaml("api-run", 2, name="api"), *_defaults(),
                                      api_name="/start")
    assert message.startswith("ok: started api-run"), message
    folder = ui.runs / "api-run"
    state = json.loads((folder / "ui_run.json").read_text())
    assert state["command"][-2:] == ["train", str(folder / "ui_config.yaml")]

    def finished():
        progress, loss, lr, samples, _ = client.predict(str(folder), api_name="/watch")
        return (progress, loss, samples) if "finished" in progress else None

    progress, loss, samples = wait_for(finished, 240, "the 2-step run to finish")
    assert progress.startswith("**api-run: finished, step 2/2")
    assert [row[0] for row in loss["data"]] == [1, 2]  # the chart's rows are train_log.jsonl's steps
    assert samples and Path(folder / "samples" / "step-000002.png").is_file()
    assert client.predict(str(folder), api_name="/stop").startswith("error:")

    adapter = folder / "api.safetensors"
    picture, info = client.predict("sdlora:tiny", "a red circle", 3, 2, 5.0, str(adapter), 0.7, "", 1.0, "", 1.0,
                                   api_name="/generate")
    saved = sorted((ui.runs / "generated").glob("*.png"))[-1]
    meta = json.loads(Image.open(saved).text["sdlora"])
    assert meta["seed"] == 3 and meta["steps"] == 2 and meta["adapters"] == [{"path": str(adapter), "weight": 0.7}]
    assert "<lora:api:0.7>" in Image.open(saved).text["parameters"] and "<lora:api:0.7>" in info
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("sdlora:tiny", "x", 0, 1, 5.0, "/etc/passwd", 1.0, "", 1.0, "", 1.0, api_name="/generate")
