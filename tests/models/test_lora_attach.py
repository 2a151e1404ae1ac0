"""LoRA goes in through peft itself, never the models' adapter integrations: transformers' `add_adapter` refuses
to run unless peft is at least the release it was written against (transformers 5.24 asks for a peft 0.22 that does
not exist), which broke every text-encoder LoRA on a bare `pip install`. These tests make the integrations fail and
check that training's attach and generation's stacking (text-encoder weights included) never reach them."""

from __future__ import annotations

import warnings

import diffusers
import numpy as np
import pytest
import transformers
from adapter_factory import make_adapter

from sdlora import formats, inference
from sdlora.models import load_base_model, lora

INTEGRATIONS = {
    transformers.PreTrainedModel: ("add_adapter", "load_adapter", "set_adapter", "delete_adapter"),
    diffusers.ModelMixin: ("add_adapter", "load_lora_adapter", "set_adapter", "set_adapters", "delete_adapters"),
}


@pytest.fixture
def no_integrations(monkeypatch):
    """Every adapter method of transformers' and diffusers' models raises, as a version gate would."""
    for cls, methods in INTEGRATIONS.items():
        for method in methods:
            if hasattr(cls, method):
                def refuse(*args, _name=f"{cls.__name__}.{method}", **kwargs):
                    raise AssertionError(f"sdlora called {_name}: it must attach through peft itself")

                monkeypatch.setattr(cls, method, refuse)


def test_training_attach_wraps_unet_and_text_encoder(tiny_base, no_integrations):
    base = load_base_model(str(tiny_base))
    for model, targets in ((base.unet, ("to_q", "to_v")), (base.text_encoder, ("q_proj", "v_proj"))):
        lora.attach(model, lora.AdapterShape(4, 4.0, targets))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
        keys = set(lora.lora_state_dict(model))
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        assert list(model.peft_config) == ["default"]
        with pytest.raises(RuntimeError, match="already attached"):  # API misuse: a bug, so a traceback
            lora.attach(model, lora.AdapterShape(4, 4.0, targets))


def test_stacking_a_kohya_file_with_text_encoder_weights(tiny_base, tmp_path, no_integrations):
    unet_only = load_base_model(str(tiny_base))
    style = formats.save_diffusers(tmp_path / "style.safetensors", make_adapter(unet_only.unet, seed=1))
    subject = formats.save_kohya(tmp_path / "subject.safetensors",
                                 make_adapter(unet_only.unet, unet_only.text_encoder, seed=2))
    pipe = inference.build_pipeline(load_base_model(str(tiny_base)), scheduler="ddim")

    def image():
        return np.asarray(inference.generate(pipe, "a red circle", seed=3, steps=2, guidance_scale=5.0)[0], np.int16)

    before = image()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(style), 0.0),
                                                inference.AdapterSpec(str(subject), 0.0)])
    # Stacking is several adapters on one model on purpose; peft's warning about it would only alarm the user.
    assert not [w for w in caught if "Already found a `peft_config`" in str(w.message)]
    assert np.array_equal(image(), before)
    style_name, subject_name = stack.names
    stack.set_weights({subject_name: (0.0, 1.0)})  # the text-encoder half alone still changes the image
    assert np.abs(image() - before).max() > 0
    stack.set_weights({style_name: (0.8, 0.8), subject_name: (0.5, 0.7)})
    unfused = image()
    stack.fuse()
    assert np.abs(image() - unfused).max() <= 1
    stack.unfuse()
    assert np.array_equal(image(), unfused)
    for name in stack.names:
        for module in (pipe.unet, pipe.text_encoder):
            lora.delete_adapter(module, name)
    assert lora.adapter_names(pipe.unet) == lora.adapter_names(pipe.text_encoder) == []
