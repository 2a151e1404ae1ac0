"""Stacking invariants: weight 0 is the base, one weight matches diffusers, two differ, fuse/unfuse, prompt tags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapter_factory import make_adapter

from sdlora import formats, inference
from sdlora.models import load_base_model, lora

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    base = load_base_model(str(tiny_base))
    folder = tmp_path_factory.mktemp("loras")
    style = formats.save_diffusers(folder / "style.safetensors", make_adapter(base.unet, base.text_encoder, seed=1))
    subject = formats.save_kohya(folder / "sub" / "subject.safetensors",
                                 make_adapter(base.unet, base.text_encoder, seed=2, rank=2, alpha=1.0))
    return style, subject


def _pipe(tiny_base):
    return inference.build_pipeline(load_base_model(str(tiny_base)), scheduler="ddim")


def _image(pipe, prompt=PROMPT):
    return np.asarray(inference.generate(pipe, prompt, seed=3, steps=3, guidance_scale=5.0)[0], np.int16)


def test_weight_zero_is_the_base_and_two_adapters_differ_from_each(tiny_base, files):
    style, subject = files
    pipe = _pipe(tiny_base)
    base = _image(pipe)
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(style), 0.0),
                                            inference.AdapterSpec(str(subject), 0.0)])
    assert np.array_equal(_image(pipe), base)
    a, b = stack.names
    stack.set_weights({a: (0.8, 0.8)})
    only_style = _image(pipe)
    stack.set_weights({b: (1.0, 1.0)})
    only_subject = _image(pipe)
    stack.set_weights({a: (0.8, 0.8), b: (1.0, 1.0)})
    both = _image(pipe)
    for one in (only_style, only_subject, base):
        assert np.abs(both - one).max() > 10
    assert np.abs(only_style - base).max() > 10


def test_stack_matches_diffusers_set_adapters(tiny_base, files):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    style, subject = files
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(style.parent), weight_name=style.name, adapter_name="style")
    pipe.load_lora_weights(str(subject.parent), weight_name=subject.name, adapter_name="subject")
    for names, weights in ((["style"], [0.6]), (["style", "subject"], [0.6, 0.9])):
        pipe.set_adapters(names, weights)
        theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3),
                      output_type="np").images[0]
        ours_pipe = _pipe(tiny_base)
        paths = {"style": style, "subject": subject}
        inference.stack_adapters(ours_pipe, [inference.AdapterSpec(str(paths[n]), w) for n, w in zip(names, weights)])
        ours = _image(ours_pipe) / 255.0
        assert np.abs(ours - theirs).max() <= 1.5 / 255, names


def test_fused_equals_unfused_and_unfuse_restores_base_exactly(tiny_base, files):
    style, subject = files
    pipe = _pipe(tiny_base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    base = _image(pipe)
    stack = inference.stack_adapters(pipe, [inference.AdapterSpec(str(style), 0.7),
                                            inference.AdapterSpec(str(subject), 1.0, 0.5)])
    unfused = _image(pipe)
    wrapped = len(lora.lora_layers(pipe.unet))
    stack.fuse()
    # fused, the models run the base's own modules: no peft wrapper is left to dispatch through
    assert wrapped > 0 and lora.lora_layers(pipe.unet) == lora.lora_layers(pipe.text_encoder) == []
    fused = _image(pipe)
    assert np.abs(fused - unfused).max() <= 1
    assert np.abs(fused - base).max() > 10
    with pytest.raises(RuntimeError, match="fused into the base weights; call unfuse"):
        stack.set_weights({})
    stack.unfuse()
    assert len(lora.lora_layers(pipe.unet)) == wrapped
    assert np.array_equal(_image(pipe), unfused)
    stack.set_weights({})
    assert np.array_equal(_image(pipe), base)
    for state, reference in ((pipe.unet.state_dict(), before), (pipe.text_encoder.state_dict(), te_before)):
        base_weights = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
        assert base_weights.keys() == reference.keys()
        assert all(torch.equal(base_weights[k], reference[k]) for k in reference)


def test_one_shot_fuse_keeps_no_copy_and_matches_the_reversible_one(tiny_base, files):
    style, subject = files
    specs = [inference.AdapterSpec(str(style), 0.7), inference.AdapterSpec(str(subject), 1.0, 0.5)]
    reversible = _pipe(tiny_base)
    inference.stack_adapters(reversible, specs).fuse()
    one_shot = _pipe(tiny_base)
    stack = inference.stack_adapters(one_shot, specs)
    stack.fuse(reversible=False)
    assert stack._fused.originals == {} and stack._fused.unwrapped == []
    assert not getattr(one_shot.unet, "peft_config", {})
    assert np.array_equal(_image(one_shot), _image(reversible))
    with pytest.raises(RuntimeError, match="reversible=False: load the pipeline again"):
        stack.unfuse()
    assert stack.fused


def test_prompt_tags_a1111_syntax():
    prompt, tags = inference.parse_prompt_loras("a cat, <lora:style:0.7> in snow <lora:sub/subject:0.5:1.0>")
    assert prompt == "a cat, in snow"
    assert tags == [("style", 0.7, 0.7), ("sub/subject", 1.0, 0.5)]
    assert inference.parse_prompt_loras("<lora:x:unet=0.3:te=0.2>")[1] == [("x", 0.3, 0.2)]
    assert inference.parse_prompt_loras("<lora:x>")[1] == [("x", 1.0, 1.0)]


def test_prompt_tags_resolve_in_lora_dir_and_match_the_flag(tiny_base, files):
    style, subject = files
    prompt, specs = inference.prompt_specs(f"{PROMPT} <lora:style:0.7> <lora:subject:0.5:1>", style.parent)
    assert prompt == PROMPT
    assert specs == [inference.AdapterSpec(str(style), 0.7, 0.7), inference.AdapterSpec(str(subject), 1.0, 0.5)]
    tagged = _pipe(tiny_base)
    inference.stack_adapters(tagged, specs)
    flagged = _pipe(tiny_base)
    inference.stack_adapters(flagged, [inference.AdapterSpec.parse(f"{style}:0.7"),
                                       inference.AdapterSpec.parse(f"{subject}:1.0:0.5")])
    assert np.array_equal(_image(tagged), _image(flagged))


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../secret", "..\\secret"])
def test_prompt_tag_cannot_leave_the_lora_dir(tmp_path, name, monkeypatch):
    inside = tmp_path / "loras"
    inside.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"not read")
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(inference.LoraNameError, match="refused, adapter names must stay inside --lora-dir"):
        inference.prompt_specs(f"a cat <lora:{name}:1>", inside)
    assert opened == []


def test_symlink_out_of_the_lora_dir_is_not_followed(tmp_path):
    inside = tmp_path / "loras"
    inside.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (inside / "secret.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (inside / "kept.safetensors").write_bytes(b"x")
    # issue 17: it was reported as "no secret.safetensors in loras (found: secret)"; it is refused, saying why
    with pytest.raises(inference.LoraNameError, match=r"<lora:secret>: refused: .*loras/secret.safetensors is a link "
                       r"to .*/secret.safetensors, which leaves --lora-dir"):
        inference.resolve_in_folder("secret", inside)
    with pytest.raises(inference.LoraNameError, match=r"found: kept\)"):  # a link that leaves is never offered
        inference.resolve_in_folder("other", inside)


def test_unknown_prompt_tag_lists_known_names(files):
    style, _ = files
    with pytest.raises(inference.LoraNameError, match=r"no nope.safetensors .*found: style, sub/subject"):
        inference.prompt_specs("<lora:nope:1>", style.parent)
    with pytest.raises(inference.LoraNameError, match="pass --lora-dir"):
        inference.prompt_specs("<lora:style:1>", None)
