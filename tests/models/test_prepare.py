"""Making a base trainable: what is checked against the base itself, once it is known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdlora.config import ConfigError, load_config
from sdlora.models.prepare import check_resolution

SHAPES_VAE = Path(__file__).resolve().parents[2] / "sdlora" / "assets" / "shapes" / "vae" / "config.json"


def _base(block_out_channels, source="my-base"):
    return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=block_out_channels)),
                           source=source)


def test_the_schema_states_its_own_rule_once_without_blaming_a_vae():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=sdlora:shapes", "data.resolution=60"])
    message = str(err.value)
    assert message.count("got 60") == 1 and "steps of 8" in message
    assert "VAE downsamples by 8" not in message  # untrue of sdlora:shapes, whose VAE downsamples by 4


def test_the_base_vae_factor_is_checked_once_the_base_is_known():
    shapes = _base(tuple(json.loads(SHAPES_VAE.read_text())["block_out_channels"]), "sdlora:shapes")
    check_resolution(shapes, load_config(None, ["data.resolution=64"]).data)  # 4x: any size in steps of 8 fits
    check_resolution(_base((128, 256, 512, 512)), load_config(None, ["data.resolution=520"]).data)  # SD: 8x
    with pytest.raises(ConfigError, match=r"^data.resolution: my-base's VAE downsamples images by 16, so "
                                          r"data.resolution must be a multiple of 16, got 520; use 512 or 528$"):
        check_resolution(_base((32, 64, 64, 64, 64)), load_config(None, ["data.resolution=520"]).data)
    bucketed = load_config(None, ["data.resolution=512", "data.bucketing.enabled=true", "data.bucketing.step=8"])
    with pytest.raises(ConfigError, match=r"^data.bucketing.step: .* got 8; use 16$"):
        check_resolution(_base((32, 64, 64, 64, 64)), bucketed.data)
