"""The shipped shapes base follows prompts, and the demo LoRAs teach what they claim: stripes rise with the style
weight while content is kept, the subject adapter draws its ring, and both show when stacked. Slow: it trains both
demo adapters (about 4 minutes on 2 CPU cores) and renders ~200 images."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.config import load_config
from sdlora.models import PACKAGED_BASES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PACKAGED_BASES["sdlora:shapes"] / "model_index.json").is_file(),
                       reason="sdlora:shapes is not in this checkout (scripts/train_base.py makes it)"),
]

# Measured for the committed base and demo configs (docs/demo.md): colour 0.93, background 1.00, shape
# 0.82; stripes 0.005 -> 0.020 -> 0.119 over style weights 0 / 0.5 / 1 with colour kept 0.96; rings 0.00 -> 0.83
# with the subject adapter; stacked: rings 0.375, striped 0.79. The thresholds leave room for float-order
# differences between machines and retrains.


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from sdlora.bench.quality import quality_report
    from sdlora.training.run import train

    out = tmp_path_factory.mktemp("demo")
    paths = {}
    for name in ("style", "subject"):
        config = load_config(ROOT / "configs" / f"demo-{name}.yaml",
                             [f"data.path={ROOT / 'datasets' / f'demo-{name}'}", f"output.dir={out / name}"])
        paths[name] = str(train(config).adapter_path)
    return quality_report("sdlora:shapes", paths["style"], paths["subject"])


def test_base_follows_colour_background_and_shape_well_above_chance(report):
    assert report["base_color"] >= 0.75  # chance 1/6
    assert report["base_background"] >= 0.8  # chance 1/5
    assert report["base_shape"] >= 0.6  # chance 1/3


def test_style_rises_with_weight_and_keeps_content(report):
    stripes = [report[f"style_{w}_stripes"] for w in ("0", "0.5", "1")]
    assert stripes[0] < stripes[1] < stripes[2], stripes
    assert report["style_0_striped"] < report["style_1_striped"]
    # content kept: the style LoRA keeps the base's colour and background adherence (within 20 %)
    assert report["style_1_color_kept"] >= 0.8 * report["base_color"]
    assert report["style_1_background_kept"] >= 0.8 * report["base_background"]


def test_subject_adapter_draws_its_object(report):
    assert report["subject_1_ring"] >= 0.5
    assert report["subject_0_ring"] < report["subject_1_ring"]


def test_stacked_images_carry_both_the_style_and_the_subject(report):
    # Each effect present in the stacked pictures, far above its rate without that adapter (0.0 for both here).
    assert report["stacked_striped"] >= 0.5 and report["stacked_striped"] > report["style_0_striped"] + 0.4
    assert report["stacked_ring"] >= 0.25 and report["stacked_ring"] > report["subject_0_ring"] + 0.2
