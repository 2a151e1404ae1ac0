from pathlib import Path

import pytest

from sdlora.config import ConfigError, load_config

SHIPPED = Path(__file__).resolve().parents[2].joinpath("configs")
EXAMPLES = sorted(SHIPPED.joinpath("examples").glob("*.yaml"))  # one per feature of docs/steering.md and docs/watching.md
CONFIGS = sorted(SHIPPED.glob("*.yaml")) + EXAMPLES


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.train.steps >= 1
    assert config.lora.rank >= 1


def _trains_at_weights(config) -> set[float]:
    """The adapter weights the images of a config's dataset train at (set by the folders' dataset.toml)."""
    from sdlora.data.sources import scan_sources

    sources = [s.model_copy(update={"path": SHIPPED.parent / s.path}) for s in config.data.resolved_sources()]
    return {record.adapter_weight for record in scan_sources(sources).records}


# What each example in configs/examples/ shows: a config that stopped setting it would no longer be its example.
EXAMPLE_SHOWS = {
    "regularization.yaml": lambda c: any(s.regularization for s in c.data.sources),
    "masked-loss.yaml": lambda c: c.data.masked_loss,
    "prodigy.yaml": lambda c: c.train.optimizer == "prodigy",
    "schedule-free.yaml": lambda c: c.train.optimizer == "adamw_schedulefree",
    "adafactor.yaml": lambda c: c.train.optimizer == "adafactor",
    "lion.yaml": lambda c: c.train.optimizer == "lion",
    "lora-plus.yaml": lambda c: c.train.lora_plus_ratio is not None,
    "huber-loss.yaml": lambda c: c.train.loss_type == "huber",
    "timestep-range.yaml": lambda c: c.train.max_timestep is not None,
    # docs/watching.md
    "validation.yaml": lambda c: c.validation.enabled and c.validation.every > 0,
    "ema.yaml": lambda c: c.ema.enabled,
    "tensorboard.yaml": lambda c: c.logging.tensorboard,
    "continue.yaml": lambda c: c.lora.init_from is not None,
}


def test_the_demo_style_trains_as_a_dial():
    """The demo's style is the example of per-folder adapter weights (docs/steering.md): a config or dataset that
    stopped training at three weights would no longer be one."""
    assert _trains_at_weights(load_config(SHIPPED / "demo-style.yaml")) == {0.25, 0.75, 1.0}


def test_each_feature_has_its_example_and_its_optimizer_takes_its_arguments():
    import torch

    from sdlora.training.optim import build_optimizer

    assert sorted(EXAMPLE_SHOWS) == [p.name for p in EXAMPLES]
    for path in EXAMPLES:
        config = load_config(path)
        assert EXAMPLE_SHOWS[path.name](config), path.name
        if config.train.optimizer != "adamw":  # its optimizer_args are names the optimizer really takes
            pytest.importorskip({"prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree",
                                 "lion": "lion_pytorch"}.get(config.train.optimizer, "torch"))
            build_optimizer(config, [("w.lora_B.default.weight", torch.nn.Parameter(torch.zeros(2)))], [])


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


def test_a_plain_value_for_a_text_list_override_is_its_one_item():
    config = load_config(CONFIGS[0].parent / "demo-style.yaml", ["sample.prompts=a red circle"])
    assert config.sample.prompts == ("a red circle",)
    assert load_config(None, ["output.trigger_words=sks"]).output.trigger_words == ("sks",)
    assert load_config(None, ["sample.prompts=[a red circle, a blue square]"]).sample.prompts == (
        "a red circle", "a blue square")


def test_an_error_from_an_override_names_the_override_not_the_file():
    path = CONFIGS[0].parent / "demo-style.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.background=255"])
    message = str(err.value)
    assert message.startswith("override data.background=255: data.background:") and str(path) not in message
    assert "'data.background=[255, …]'" in message  # the syntax to use
    with pytest.raises(ConfigError, match=r"^override train.steps=2: .*must be below train.steps \(2\)"):
        load_config(path, ["train.steps=2"])  # an error between fields names the override it involves
    with pytest.raises(ConfigError, match=r"^override 'train.steps=a lot': train.steps: .*\(got 'a lot'\)$"):
        load_config(path, ["train.steps=a lot"])


def test_an_error_in_the_file_still_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train.steps: "):
        load_config(path, ["train.learning_rate=1e-3", "sample.prompts=a red circle"])


def test_an_empty_override_of_a_text_list_empties_it():
    assert load_config(CONFIGS[0].parent / "demo-style.yaml", ["sample.prompts="]).sample.prompts == ()
