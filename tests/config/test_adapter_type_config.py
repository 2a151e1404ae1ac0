"""`lora.type` and its options are validated at load: an option of another type, or one a type cannot honour, is
refused in one line that names the field."""

from __future__ import annotations

import pytest

from sdlora.config import ConfigError, load_config


@pytest.mark.parametrize("overrides, field", [
    (["lora.type=loha", "lora.factor=4"], "lora.factor"),
    (["lora.decompose_both=true"], "lora.decompose_both"),
    (["lora.type=lokr", "lora.factor=0"], "lora.factor"),
    (["lora.type=lokr", "lora.dropout=0.1"], "lora.dropout"),
    (["lora.conv_alpha=2"], "lora.conv_alpha"),
    (["lora.type=dora", "lora.init_from=x.safetensors"], "lora.init_from"),
    (["lora.type=loha", "output.kohya=true"], "output.kohya"),
    (["lora.type=bogus"], "lora.type"),
    (["lora.type=loha", "train.lora_plus_ratio=16"], "train.lora_plus_ratio"),
    (["lora.type=lokr", "model.quantize=nf4"], "model.quantize"),
    (["lora.type=dora", "lora.conv_rank=2", "model.quantize=int8"], "model.quantize"),
])
def test_options_that_do_not_belong_are_refused_by_name(overrides, field):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    message = str(error.value)
    assert field in message and "\n" not in message.strip(), message


def test_typed_options_load():
    config = load_config(None, ["lora.type=lokr", "lora.factor=4", "lora.decompose_both=true", "lora.conv_rank=2"])
    assert (config.lora.type, config.lora.factor, config.lora.decompose_both) == ("lokr", 4, True)
    assert config.lora.effective_conv_alpha == 2.0  # conv alpha defaults to the conv rank, as kohya's
    assert load_config(None, ["lora.type=dora", "lora.dropout=0.1"]).lora.dropout == 0.1


@pytest.mark.parametrize("override, field", [("lora.type=loha", "lora.type"), ("lora.conv_rank=4", "lora.conv_rank")])
def test_sd3_refuses_types_it_does_not_train(override, field):
    from sdlora.models import sd3

    config = load_config(None, [override])
    with pytest.raises(ConfigError, match=field):
        sd3.check_training(config)
