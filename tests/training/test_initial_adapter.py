"""Continue from an adapter (`lora.init_from`): the run's LoRA starts as the file's weights, in either layout, then
trains; a file of another shape is refused with one line naming the fields."""

from __future__ import annotations

import pytest
import torch

from sdlora import formats
from sdlora.config import ConfigError
from sdlora.training.run import TrainingRun


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, style_dataset):
    """A 3-step adapter with UNet and text-encoder LoRA, in the diffusers and the kohya layout."""
    from sdlora.config import load_config
    from sdlora.training.run import train

    root = tmp_path_factory.mktemp("init-from")
    result = train(load_config(None, [
        f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64", "train.steps=3",
        "train.batch_size=2", "train.learning_rate=1e-2", f"output.dir={root / 'first'}", "output.kohya=true",
        "lora.train_text_encoder=true",
    ]))
    return result.adapter_path, root / "first" / "pytorch_lora_weights_kohya.safetensors"


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_the_lora_starts_as_the_file_then_trains(trained, make_config, layout):
    from sdlora.models.lora import lora_state_dict

    path = trained[0] if layout == "diffusers" else trained[1]
    run = TrainingRun(make_config(f"lora.init_from={path}", "lora.train_text_encoder=true", "train.steps=2"))
    run.build()
    source = formats.read_adapter(trained[0]).tensors
    for component, model in (("unet", run.base.unet), ("text_encoder", run.base.text_encoder)):
        live = lora_state_dict(model)
        assert live.keys() == source[component].keys()
        for key, value in live.items():  # the kohya copy is the same fp32 numbers under other names
            assert torch.equal(value, source[component][key]), (component, key)
    if layout == "diffusers":  # then it trains from there (once is enough: the layout only changes the start)
        result = run.fit()
        after = formats.read_adapter(result.adapter_path).tensors["unet"]
        assert any(not torch.equal(after[k], source["unet"][k]) for k in after), "the continued run did not train"


def test_a_unet_only_run_refuses_a_file_with_text_encoder_lora(trained, make_config):
    run = TrainingRun(make_config(f"lora.init_from={trained[0]}"))
    with pytest.raises(ConfigError, match="holds a text_encoder LoRA, which this run does not train"):
        run.build()


def test_a_file_of_another_rank_is_refused_naming_the_fields(trained, make_config):
    run = TrainingRun(make_config(f"lora.init_from={trained[0]}", "lora.train_text_encoder=true", "lora.rank=8"))
    with pytest.raises(ConfigError, match=r"has rank 4 and alpha 4 .* lora.rank=8 and lora.alpha=8: set lora.rank"):
        run.build()
