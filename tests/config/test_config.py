from pathlib import Path

import pytest

from sdlora.config import ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.steps >= 1
    assert config.lora.rank >= 1


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo-cpu.yaml", "sd15-gpu.yaml"} <= names


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lerning_rate: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lerning_rate" in message and "did you mean 'learning_rate'" in message
    assert str(path) in message


def test_unknown_section_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[traning]\nsteps = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'traning'.*did you mean 'train'"):
        load_config(path)


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=many"])
    assert "train.steps" in str(err.value) and "'many'" in str(err.value)


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.mixed_precision=fp32"])
    assert "train.mixed_precision" in str(err.value)
    assert "'no', 'fp16', 'bf16' or 'auto'" in str(err.value)


def test_resolution_must_be_multiple_of_8():
    with pytest.raises(ConfigError, match="data.resolution.*multiple of 8"):
        load_config(None, ["data.resolution=100"])


def test_overrides_parse_yaml_values_and_config_is_frozen():
    config = load_config(None, ["train.learning_rate=3e-4", "lora.unet_targets=[to_q, to_v]", "data.random_flip=true"])
    assert config.train.learning_rate == pytest.approx(3e-4)
    assert config.lora.unet_targets == ("to_q", "to_v")
    assert config.data.random_flip is True
    with pytest.raises(Exception):
        config.train.steps = 5


def test_alpha_defaults_to_rank():
    assert load_config(None, ["lora.rank=8"]).lora.effective_alpha == 8.0
    assert load_config(None, ["lora.rank=8", "lora.alpha=16"]).lora.effective_alpha == 16.0


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.steps"])


def test_a_misspelt_key_inside_a_source_suggests_the_source_fields():
    from sdlora.config import validate_config

    with pytest.raises(ConfigError) as info:
        validate_config({"data": {"sources": [{"path": "a", "repeat": 2}]}})
    message = str(info.value)
    assert "data.sources.0.repeat" in message and "did you mean 'repeats'?" in message
    assert "Allowed here: path" in message and "cache_latents" not in message
