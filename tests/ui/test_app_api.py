"""The app's API without a browser (gradio_client against a running `sdlora ui`): open a dataset (a folder or a run
config, problem files marked), edit a caption, validate a config (each error at its field), train on the tiny base as
a separate process, read the loss and validation loss back, generate with
adapters at UNet and text-encoder weights, `<lora:…>` tags and an XY grid, push to a test Hub."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.ui import form
from tests.ui.conftest import FAKE_TOKEN, REPO, training_yaml, wait_for

# Skipped, not an error, where the UI extra is not installed (a GPU machine collected this file without it).
_client_errors = pytest.importorskip("gradio_client.exceptions", reason="pip install -e '.[ui-test]'")
AppError, ValidationError = _client_errors.AppError, _client_errors.ValidationError


def _defaults():
    return [f.default for f in form.fields()]


def _rows(*adapters):
    """The Generate tab's three adapter rows (path, UNet weight, text-encoder weight), empty ones filled in."""
    rows = [*adapters, *[("", 1.0, 1.0)] * (3 - len(adapters))]
    return [value for row in rows for value in row]


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


def test_a_run_config_opens_its_data_with_each_problem_file_marked(client, ui):
    folder = ui.root / "problem-set"
    folder.mkdir()
    for name in ("000", "001", "002"):
        shutil.copy(REPO / "datasets" / "demo-style" / f"{name}.png", folder / f"{name}.png")
    (folder / "000.txt").write_text("a red circle, striped style\n")
    (folder / "001.txt").write_text("a blue square, striped style\n")  # 002 has no caption
    shutil.copy(folder / "000.png", folder / "003.png")  # the same picture twice
    (folder / "003.txt").write_text("the same picture again\n")
    (ui.root / "problem-run.yaml").write_text("data: {path: problem-set, resolution: 64}\ntrain: {steps: 5}\n")

    gallery, status, problems, report = client.predict("problem-run.yaml", 512, api_name="/open_dataset")
    assert status == "4 images, 2 marked ⚠", status
    captions = [item["caption"] for item in gallery]
    marked = sorted(c for c in captions if c.startswith("⚠"))
    assert marked[0].startswith("⚠ caption_missing: ") and marked[1].startswith("⚠ duplicate: same content as ")
    assert "a blue square, striped style" in captions  # an image without a problem keeps its plain caption
    assert sorted((row[0], row[1]) for row in problems["data"]) == [("002.png", "caption_missing"),
                                                                     ("003.png", "duplicate")]
    assert "  resolution 64" in report  # the config's resolution, not the form's 512
    outside = client.predict(str(REPO / "configs" / "demo.yaml"), 64, api_name="/open_dataset")[1]
    assert outside.startswith("error:") and "outside the folders" in outside


def test_validation_errors_are_shown_at_their_field(client):
    values = [(-3 if f.key == "train.steps" else "[a, b" if f.key == "sample.prompts" else f.default)
              for f in form.fields()]
    with pytest.raises(ValidationError) as refused:
        client.predict("Form", "", *values, api_name="/validate")
    lines = str(refused.value).splitlines()
    assert lines[0] == "2 parameter(s) failed validation:"  # one message per wrong field, nothing for the others
    index = {f.key: number + 2 for number, f in enumerate(form.fields())}  # inputs: source, yaml, then the fields
    assert f"- parameter_{index['train.steps']}: the form: train.steps: Input should be greater than or equal to 1" \
        in "\n".join(lines)
    prompts = f"- parameter_{index['sample.prompts']}: sample.prompts: cannot parse"
    assert any(line.startswith(prompts) for line in lines)
    bad = client.predict("YAML", "train: {steps: -3}\n", *_defaults(), api_name="/validate")
    assert bad.startswith("error:") and "train.steps" in bad  # the YAML editor's errors: under the form
    good = client.predict("YAML", training_yaml("api-check", 2), *_defaults(), api_name="/validate")
    assert good.startswith("ok: valid: 2 steps")


@pytest.fixture(scope="module")
def trained(client, ui):
    """A 2-step run on the tiny base with a held-out set scored at its last step, trained to the end."""
    message, _ = client.predict("YAML", training_yaml("api-run", 2, name="api", validation=True), *_defaults(),
                                api_name="/start")
    assert message.startswith("ok: started api-run"), message

    def finished():
        progress, loss, lr, samples, _ = client.predict(str(ui.runs / "api-run"), api_name="/watch")
        return (progress, _value(loss), _value(lr), samples) if "finished" in progress else None

    return wait_for(finished, 240, "the 2-step run to finish")


def _value(output):
    """A chart's value from /watch, which updates each chart (hidden until its first point) with it."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def _scaled_copy(adapter: Path, target: Path, factor: float) -> Path:
    """A second, clearly different adapter for the same base: the run's with every up-projection scaled."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(adapter, "pt") as handle:
        tensors = {k: handle.get_tensor(k) * (factor if "lora_B" in k or "lora_up" in k else 1) for k in handle.keys()}
        metadata = handle.metadata()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target, metadata)
    return target


def test_a_run_trains_in_its_own_process_with_its_loss_and_validation_loss_charted(trained, client, ui):
    folder = ui.runs / "api-run"
    state = json.loads((folder / "ui_run.json").read_text())
    assert state["command"][-2:] == ["train", str(folder / "ui_config.yaml")]
    progress, loss, lr, samples = trained
    assert progress.startswith("**api-run: finished, step 2/2")
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    # The chart's rows are train_log.jsonl's: the training loss at each step, the validation loss where scored.
    assert [row for row in loss["data"] if row[2] == "train loss"] == [
        [r["step"], pytest.approx(r["loss"]), "train loss"] for r in log]
    assert [row for row in loss["data"] if row[2] == "validation loss"] == [
        [2, pytest.approx(log[-1]["val_loss"]), "validation loss"]]
    assert [row[:2] for row in lr["data"]] == [[r["step"], pytest.approx(r["lr"])] for r in log]
    assert samples and Path(folder / "samples" / "step-000002.png").is_file()
    assert client.predict(str(folder), api_name="/stop").startswith("error:")


def test_generate_with_te_weights_lora_tags_and_a_weight_grid(trained, client, ui):
    adapter = ui.runs / "api-run" / "api.safetensors"
    strong = _scaled_copy(adapter, ui.root / "loras" / "strong.safetensors", -200.0)
    picture, info = client.predict("sdlora:tiny", "a red circle <lora:strong:0.5>", 3, 2, 5.0, str(ui.root / "loras"),
                                   1, "0,1", *_rows((str(adapter), 0.7, 0.3)), api_name="/generate")
    saved = sorted((ui.runs / "generated").glob("*-grid.png"))[-1]
    text = Image.open(saved).text
    meta = json.loads(text["sdlora"])
    assert meta["adapters"] == [{"path": str(adapter), "weight": 0.7, "text_encoder_weight": 0.3},
                                {"path": str(strong), "weight": 0.5, "text_encoder_weight": 0.5}]
    assert meta["grid"] == {"adapter": 1, "weights": [0.0, 1.0]} and meta["seed"] == 3 and meta["steps"] == 2
    assert text["parameters"].startswith("a red circle <lora:api:0.3:0.7> <lora:strong:0.5>\nSteps: 2")
    assert "XY grid: strong weight 0, 1" in text["parameters"] and info == text["parameters"]
    grid = np.asarray(Image.open(saved).convert("RGB"), dtype=np.int16)
    cells = grid[-64:, -128:-64], grid[-64:, -64:]  # the two 64-px cells, below their labels
    assert np.abs(cells[0] - cells[1]).mean() > 2  # the grid sets the tagged adapter's weight per cell
    with pytest.raises(AppError, match="outside the folders"):
        client.predict("sdlora:tiny", "x", 0, 1, 5.0, "", 0, "", *_rows(("/etc/passwd", 1.0, 1.0)),
                       api_name="/generate")
    with pytest.raises(AppError, match="<lora:nothing-here>: no nothing-here.safetensors"):
        client.predict("sdlora:tiny", "x <lora:nothing-here:1>", 0, 1, 5.0, str(ui.runs), 0, "", *_rows(),
                       api_name="/generate")


def test_push_to_the_hub_never_shows_or_writes_the_token(trained, client, ui, hub):
    folder = ui.runs / "api-run"
    message = client.predict(str(folder), "alice/ui-push", api_name="/push")
    assert message.startswith("ok: pushed: ") and "alice/ui-push" in message, message
    files = hub.repos["alice/ui-push"].files
    assert {"README.md", "config.yaml", "api.safetensors"} <= set(files)
    assert files["api.safetensors"] == (folder / "api.safetensors").read_bytes()
    assert any(r.authorization == f"Bearer {FAKE_TOKEN}" for r in hub.state.requests)  # it came from HF_TOKEN
    card = client.predict(str(folder), "alice/ui-push", api_name="/card")
    with urllib.request.urlopen(ui.url) as page, urllib.request.urlopen(ui.url.rstrip("/") + "/config") as config:
        served = page.read().decode() + config.read().decode()
    written = [p.read_bytes() for p in [*ui.runs.rglob("*"), *ui.root.rglob("*")] if p.is_file()]
    for seen in (message, card, served, "".join(ui.output), *(b.decode("latin-1") for b in written)):
        assert FAKE_TOKEN not in seen and FAKE_TOKEN[3:20] not in seen
