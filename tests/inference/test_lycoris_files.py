"""Files written by the lycoris-lora package itself load in sdlora with LyCORIS' own outputs, and stack with LoRAs.

The reference is lycoris-lora 4.1.3: `lycoris.kohya.create_network` writes each type on the tiny SD1 / SDXL bases
(random non-zero weights), `create_network_from_weights` + `apply_to` applies the file to a copy of the base, and
its UNet / text-encoder outputs are compared with sdlora's `stack_adapters` on the same inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_factory import make_adapter
from safetensors.torch import load_file, save_file

from sdlora import formats, inference
from sdlora.formats import kohya, lycoris
from sdlora.models import load_base_model

lk = pytest.importorskip("lycoris.kohya")

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (file name, create_network kwargs): every type, conv layers (LoCon) on, Tucker forms where LyCORIS offers them.
TYPES = {
    "locon": {"algo": "lora", "conv_dim": 4, "conv_alpha": 2},
    "locon_tucker": {"algo": "lora", "conv_dim": 4, "conv_alpha": 2, "use_tucker": True},
    "dora": {"algo": "lora", "dora_wd": True, "conv_dim": 4, "conv_alpha": 2},
    "loha": {"algo": "loha", "conv_dim": 4, "conv_alpha": 2, "use_tucker": True},
    "lokr": {"algo": "lokr", "factor": 4, "conv_dim": 4, "conv_alpha": 2},  # w1 whole, w2 a pair or whole
}


@pytest.fixture(scope="module", autouse=True)
def _sd_preset():
    # LyCORIS 4.1.3's "full" preset targets the TimestepEmbedding class AND its linear_1/linear_2 by name, which on
    # a diffusers UNet creates each module twice and fails its own duplicate check: drop the class target.
    full = lk.PRESET["full"]
    preset = {key: full[key] for key in full}
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    lk.PRESET["sdlora-test"] = preset
    yield
    del lk.PRESET["sdlora-test"]


def _write(base, path, seed, **kwargs):
    encoders = [base.text_encoder, base.text_encoder_2] if base.family == "sdxl" else base.text_encoder
    unet, te = copy.deepcopy(base.unet), copy.deepcopy(encoders)
    network = lk.create_network(1.0, 4, 2.0, None, te, unet, preset="sdlora-test", **kwargs)
    network.apply_to(te, unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("dora_scale"):  # magnitudes near the base's norms, as training leaves them
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    network.save_weights(str(path), torch.float32, {"ss_network_args": str(kwargs).replace("'", '"')
                                                    .replace("True", "true")})
    return path


@pytest.fixture(scope="module")
def sd1(tiny_base, tmp_path_factory):
    base = load_base_model(str(tiny_base))
    folder = tmp_path_factory.mktemp("lyco")
    files = {name: _write(base, folder / f"{name}.safetensors", n, **kw) for n, (name, kw) in enumerate(TYPES.items())}
    files["plain"] = formats.save_kohya(folder / "plain.safetensors",
                                        make_adapter(base.unet, base.text_encoder, seed=7, rank=2, alpha=1.0))
    return base, files


def _inputs(base):
    generator = torch.Generator().manual_seed(0)
    unet = base.unet
    latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 6, unet.config.cross_attention_dim, generator=generator)
    ids = torch.randint(0, base.text_encoder.config.vocab_size, (1, 6), generator=generator)
    extra = {}
    if base.family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, unet.config.projection_class_embeddings_input_dim
                                                                  - 6 * unet.config.addition_time_embed_dim,
                                                                  generator=generator),
                                       "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]])}}
    return latents, hidden, ids, extra


def _outputs(unet, encoder, inputs):
    latents, hidden, ids, extra = inputs
    with torch.no_grad():
        return unet(latents, 10, hidden, **extra).sample, encoder(ids)[0]


def _reference(base, path, multiplier=1.0, plain=None):
    """LyCORIS applying `path` to a copy of the base (and, for stacking, the plain LoRA `plain` = (file, weight)
    through sdlora's verified peft path on that same copy: each reference tool applying its own file)."""
    unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    network, _ = lk.create_network_from_weights(multiplier, str(path), None, te, unet, for_inference=True)
    network.apply_to(te, unet, True, True)
    assert len(network.unet_loras) > 20 and len(network.text_encoder_loras) > 5
    if plain is not None:
        from sdlora.models import lora

        adapter = formats.read_adapter(plain[0])
        for component, module in (("unet", unet), ("text_encoder", te)):
            lora.load_adapter(module, adapter.tensors[component], adapter.shapes[component], "plain")
            lora.set_weights(module, {"plain": plain[1]})
    return _outputs(unet, te, _inputs(base))


def _sdlora(base, specs):
    pipe = inference.build_pipeline(copy.deepcopy(base), scheduler="ddim")
    stack = inference.stack_adapters(pipe, specs)
    return pipe, stack, _outputs(pipe.unet, pipe.text_encoder, _inputs(base))


@pytest.mark.parametrize("kind", list(TYPES))
def test_lycoris_written_file_loads_with_lycoris_outputs(sd1, kind):
    base, files = sd1
    adapter = formats.read_adapter(files[kind])
    if kind == "locon":  # plain lora_up/lora_down keys: the unchanged peft path reads it
        assert not isinstance(adapter, lycoris.LycorisFile) and adapter.shapes["unet"].rank == 4
    else:
        assert isinstance(adapter, lycoris.LycorisFile)
        parts = {p for _, _, layer in adapter.layer_items() for p in layer}
        assert {"locon_tucker": "lora_mid.weight", "dora": "dora_scale", "loha": "hada_t1", "lokr": "lokr_w2_a"}[kind] \
            in parts  # the file holds the variant this case is about
    assert lycoris.adapter_type(adapter) == kind.removesuffix("_tucker")
    want_unet, want_te = _reference(base, files[kind])
    pipe, stack, (unet_out, te_out) = _sdlora(base, [inference.AdapterSpec(str(files[kind]), 1.0)])
    base_unet, base_te = _outputs(base.unet, base.text_encoder, _inputs(base))
    assert (want_unet - base_unet).abs().max() > 1e-2 and (want_te - base_te).abs().max() > 1e-2
    torch.testing.assert_close(unet_out, want_unet, **TOL)
    torch.testing.assert_close(te_out, want_te, **TOL)
    # weight 0 puts every patched weight back bit for bit
    stack.set_weights({stack.names[0]: (0.0, 0.0)})
    originals = {**dict(base.unet.named_parameters()), **dict(base.text_encoder.named_parameters(prefix="te"))}
    now = [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters(prefix="te")]
    for name, param in now:
        if ".lora_" not in name:
            assert torch.equal(param, originals[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_stacks_with_a_plain_lora_at_weights(sd1, kind):
    base, files = sd1
    specs = [inference.AdapterSpec(str(files[kind]), 0.7), inference.AdapterSpec(str(files["plain"]), 0.4)]
    _, stack, (both_unet, both_te) = _sdlora(base, specs)
    want_unet, want_te = _reference(base, files[kind], 0.7, plain=(files["plain"], 0.4))
    torch.testing.assert_close(both_unet, want_unet, **TOL)
    torch.testing.assert_close(both_te, want_te, **TOL)
    lyco_name, plain_name = stack.names
    stack.set_weights({lyco_name: (0.7, 0.7)})
    only_lyco = _outputs(stack.pipe.unet, stack.pipe.text_encoder, _inputs(base))[0]
    torch.testing.assert_close(only_lyco, _reference(base, files[kind], 0.7)[0], **TOL)
    stack.set_weights({plain_name: (0.4, 0.4)})
    only_plain = _outputs(stack.pipe.unet, stack.pipe.text_encoder, _inputs(base))[0]
    for alone in (only_lyco, only_plain):
        assert (both_unet - alone).abs().max() > 1e-2


def test_onetrainer_dotted_names_load_the_same_layers(sd1, tmp_path):
    """The same LoHa under OneTrainer's dotted names (`unet.<module>.hada_w1_a`) reads into the same layers."""
    _, files = sd1
    state = load_file(str(files["loha"]))
    dotted = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        component, path = kohya.parse_module_name(name)
        dotted[f"{component}.{path}.{part}"] = value
    save_file(dotted, str(tmp_path / "onetrainer.safetensors"))
    a, b = formats.read_adapter(files["loha"]), formats.read_adapter(tmp_path / "onetrainer.safetensors")
    assert a.layers.keys() == b.layers.keys() and len(list(a.layer_items())) > 30
    for component, path, parts in a.layer_items():
        other = b.layers[component][path]
        assert parts.keys() == other.keys() and all(torch.equal(parts[k], other[k]) for k in parts)


def test_sdxl_lycoris_file_with_both_text_encoders_and_sgm_names(tiny_sdxl_base, tmp_path):
    base = load_base_model(str(tiny_sdxl_base))
    path = _write(base, tmp_path / "lokr_xl.safetensors", 3, algo="lokr", factor=4, conv_dim=4, conv_alpha=2)
    keys = load_file(str(path)).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    unet, te1, te2 = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder), copy.deepcopy(base.text_encoder_2)
    network, _ = lk.create_network_from_weights(1.0, str(path), None, [te1, te2], unet, for_inference=True)
    network.apply_to([te1, te2], unet, True, True)
    inputs = _inputs(base)
    want = _outputs(unet, te2, inputs)
    # kohya sd-scripts names SDXL UNet modules the SGM way (input_blocks_4_1_...): rename and load that too
    sgm = {}
    for key, value in load_file(str(path)).items():
        name, _, part = key.partition(".")
        component, module = kohya.parse_module_name(name)
        sgm[f"{kohya.module_name(component, module, 'sdxl') if component == 'unet' else name}.{part}"] = value
    assert any(k.startswith("lora_unet_input_blocks_") for k in sgm)
    save_file(sgm, str(tmp_path / "lokr_xl_sgm.safetensors"))
    for file in (path, tmp_path / "lokr_xl_sgm.safetensors"):
        pipe = inference.build_pipeline(copy.deepcopy(base), scheduler="ddim")
        inference.stack_adapters(pipe, [inference.AdapterSpec(str(file), 1.0)])
        got = _outputs(pipe.unet, pipe.text_encoder_2, inputs)
        torch.testing.assert_close(got[0], want[0], **TOL)
        torch.testing.assert_close(got[1], want[1], **TOL)
