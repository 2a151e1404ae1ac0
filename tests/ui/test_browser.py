"""The whole job in a real headless browser (Debian's chromium through playwright): open the page, open the demo
dataset, edit a caption, start a run on the tiny base, watch its loss chart and first sample, stop and resume it,
generate with two adapters at two weights, preview the card; a screenshot of each tab goes to test-artifacts/
(and, with SDLORA_UI_DOCS_SCREENSHOT=1, the Train tab's, 20 steps into a run, to docs/images/ui-train.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.ui.conftest import ARTIFACTS, REPO, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _max_step(folder: Path) -> int:
    from sdlora.ui.runs import read_log

    return max((row["step"] for row in read_log(folder)), default=0)


def _negated_copy(adapter: Path, target: Path) -> Path:
    """A second, different adapter for the same base: the run's with every up-projection negated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(adapter, "pt") as handle:
        tensors = {k: (-handle.get_tensor(k) if "lora_B" in k or "lora_up" in k else handle.get_tensor(k))
                   for k in handle.keys()}
        metadata = handle.metadata()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target, metadata)
    return target


def _fill(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id}").locator("textarea, input").first
    field.fill(str(value))
    field.press("Tab")  # gradio takes a field's value when it loses focus


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: as root, `apt-get install chromium` "
                    "(scripts/setup.sh does it where it can)")
def test_the_whole_job_in_a_headless_browser(ui):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[ui-test]' (playwright)")
    ARTIFACTS.mkdir(exist_ok=True)
    caption_file = ui.root / "demo-style" / "002.txt"
    folder = ui.runs / "browser-run"
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(120_000)
        expect = sync_api.expect
        expect.set_options(timeout=180_000)  # a loaded 2-core machine: steps and samples take seconds each
        page.goto(ui.url)

        # Dataset: open the demo copy, pick the third image, change its caption.
        _fill(page, "dataset-folder", "demo-style")
        _fill(page, "dataset-resolution", 64)  # the demo's 64-px images are not "small" at 64
        page.locator("#dataset-open").click()
        expect(page.locator("#caption-status")).to_have_text("24 images")  # none marked ⚠: no problem at 64 px
        page.locator("#dataset-gallery img").nth(2).click()
        expect(page.locator("#caption-text textarea")).to_have_value(caption_file.read_text().strip())
        page.locator("#caption-text textarea").fill("a hand-edited caption, striped style")
        page.locator("#caption-save").click()
        expect(page.locator("#caption-status")).to_contain_text("saved 002.txt")
        assert caption_file.read_text() == "a hand-edited caption, striped style\n"
        expect(page.locator("#preflight")).to_contain_text("usable 24")
        page.screenshot(path=ARTIFACTS / "ui-dataset.png", full_page=False)

        # Train: a wrong value is shown at its own field (the schema's validation), before anything starts.
        page.get_by_role("tab", name="Train").click()
        _fill(page, "field-train-steps", -3)
        page.locator("#validate").click()
        expect(page.locator("#field-train-steps")).to_contain_text("train.steps: Input should be greater than or equal")
        expect(page.locator("#field-train-batch_size")).not_to_contain_text("Input should")

        # The form filled in: a long run, so it can be stopped and resumed mid-way; for the README's screenshot it
        # runs until the charts show a curve (warm-up and cosine learning rate, a validation loss every 5 steps).
        # For the README's screenshot the run is the demo's style LoRA on the shipped shapes base, so its samples
        # show shapes taking on the stripes (the tiny test base draws noise).
        docs = os.environ.get("SDLORA_UI_DOCS_SCREENSHOT") == "1"
        steps, shown_at = (300, 120) if docs else (200, 2)
        run = [("field-model-base", "sdlora:tiny"), ("field-train-batch_size", 2),
               ("field-train-learning_rate", 0.001), ("field-train-lr_warmup_steps", 5),
               ("field-sample-prompts", "[circle, square]"), ("field-sample-every", 2), ("field-sample-steps", 1),
               ("field-validation-every", 5)]
        if docs:
            run = [("field-model-base", "sdlora:shapes"), ("field-train-batch_size", 8), ("field-lora-rank", 8),
                   ("field-lora-alpha", 8), ("field-train-learning_rate", 0.002), ("field-train-lr_warmup_steps", 20),
                   ("field-train-snr_gamma", 5.0), ("field-train-noise_offset", 0.25),
                   ("field-sample-prompts", '["a red circle on a blue background, striped style", '
                                            '"a yellow square on a green background, striped style"]'),
                   ("field-sample-every", 30), ("field-sample-steps", 25), ("field-sample-guidance_scale", 5.0),
                   ("field-validation-every", 10)]
        for elem_id, value in [*run, ("field-data-path", "demo-style"), ("field-data-resolution", 64),
                               ("field-train-steps", steps), ("field-train-checkpoint_every", 1000),
                               ("field-validation-fraction", 0.25), ("field-validation-timesteps", 2),
                               ("field-output-dir", "browser-run"), ("field-output-name", "browser")]:
            _fill(page, elem_id, value)
        page.locator("#field-train-lr_scheduler input").click()
        page.get_by_role("option", name="cosine", exact=True).click()
        page.locator("#start").click()
        expect(page.locator("#train-message")).to_contain_text("started browser-run")
        expect(page.locator("#field-train-steps")).not_to_contain_text("Input should")  # the error went away
        wait_for(lambda: _max_step(folder) >= shown_at, 900, f"step {shown_at} of the browser's run")
        expect(page.locator("#loss-chart canvas, #loss-chart svg").first).to_be_visible()
        expect(page.locator("#samples img").first).to_be_visible()
        page.evaluate("window.scrollTo(0, 0)")  # the top of the tab: the run, its charts and samples
        page.wait_for_timeout(2000)  # two more polls: the charts and gallery drawn with the latest step
        # The gallery's images load lazily, once in view: wait until every one is drawn, none blank.
        page.wait_for_function("() => [...document.querySelectorAll('#samples img')].every("
                               "i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=ARTIFACTS / "ui-train.png", full_page=False)
        if docs:
            (REPO / "docs" / "images").mkdir(exist_ok=True)
            shutil.copy(ARTIFACTS / "ui-train.png", REPO / "docs" / "images" / "ui-train.png")
        expect(page.locator("#run-progress")).to_contain_text(re.compile(rf"running, step \d+/{steps}, about \d+ s left"))

        page.locator("#stop").click()
        expect(page.locator("#run-progress")).to_contain_text("stopped")
        stopped_at = _max_step(folder)
        assert (folder / "checkpoints" / f"step-{stopped_at:06d}").is_dir() and stopped_at < steps
        page.locator("#resume").click()
        expect(page.locator("#run-progress")).to_contain_text("running")
        wait_for(lambda: _max_step(folder) > stopped_at, 180, "the resumed run to pass its checkpoint")
        page.locator("#stop").click()
        expect(page.locator("#run-progress")).to_contain_text("stopped")

        # Generate: the run's adapter at 0.8 and a different one at -0.4, two denoising steps.
        first = folder / "browser.safetensors"
        second = _negated_copy(first, ui.root / "adapters" / "negated.safetensors")
        page.get_by_role("tab", name="Generate").click()
        _fill(page, "gen-base", "sdlora:shapes" if docs else "sdlora:tiny")  # the base the run's adapter is for
        _fill(page, "gen-prompt", "a red circle on a blue background")
        _fill(page, "gen-steps", 2)
        for number, (path, weight) in enumerate([(first, 0.8), (second, -0.4)]):
            _fill(page, f"adapter-{number}", path)
            _fill(page, f"weight-{number}", weight)
        _fill(page, "te-weight-1", 0.5)
        page.locator("#generate").click()
        expect(page.locator("#gen-result img")).to_be_visible()
        saved = sorted((ui.runs / "generated").glob("*.png"))[-1]
        meta = json.loads(Image.open(saved).text["sdlora"])
        assert meta["adapters"] == [{"path": str(first), "weight": 0.8, "text_encoder_weight": 1.0},
                                    {"path": str(second), "weight": -0.4, "text_encoder_weight": 0.5}]
        page.screenshot(path=ARTIFACTS / "ui-generate.png", full_page=False)

        page.get_by_role("tab", name="Share").click()
        _fill(page, "share-run", folder)
        page.locator("#card-button").click()
        expect(page.locator("#card-preview")).to_contain_text("browser")
        page.screenshot(path=ARTIFACTS / "ui-share.png", full_page=False)
        browser.close()
