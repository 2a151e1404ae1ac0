"""Files written by the lycoris-lora package itself load in sdlora with LyCORIS' own outputs, and stack with LoRAs.

The reference is lycoris-lora 4.1.3: `lycoris.kohya.create_network` writes each type on the tiny SD1 / SDXL bases
(random non-zero weights), `create_network_from_weights` + `apply_to` applies the file to a copy of the base, and
its UNet / text-encoder outputs are compared with sdlora's `stack_adapters` on the same inputs.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from adapter_factory import make_adapter
from PIL import Image
from safetensors.torch import load_file, save_file

from sdlora import cli, formats, inference
from sdlora.formats import kohya, ldm, lycoris
from sdlora.models import load_base_model
from sdlora.models.lora import AdapterMismatchError

lk = pytest.importorskip("lycoris.kohya")

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (file name, create_network kwargs): every type, conv layers (LoCon) on, Tucker forms where LyCORIS offers them.
TYPES = {
    "lora": {"algo": "lora", "preset": "attn-mlp"},  # no convolutions: kohya's plain LoRA
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


def _write(base, path, seed, preset="sdlora-test", **kwargs):
    encoders = [base.text_encoder, base.text_encoder_2] if base.family == "sdxl" else base.text_encoder
    unet, te = copy.deepcopy(base.unet), copy.deepcopy(encoders)
    network = lk.create_network(1.0, 4, 2.0, None, te, unet, preset=preset, **kwargs)
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
    if kind in ("lora", "locon"):  # plain lora_up/lora_down keys: the unchanged peft path reads it
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


@pytest.mark.parametrize("kind", ["lora", "locon", "dora", "loha", "lokr"])
def test_stacks_with_a_plain_lora_at_weights(sd1, kind):
    base, files = sd1
    # DoRA at a weight s != 1 follows ComfyUI / A1111 (W + s * (DoRA(W) - W): weight 0 is the base, weights add),
    # where LyCORIS' own multiplier scales only the inner update; the two agree at 1, so DoRA is compared there.
    weight = 1.0 if kind == "dora" else 0.7
    specs = [inference.AdapterSpec(str(files[kind]), weight), inference.AdapterSpec(str(files["plain"]), 0.4)]
    _, stack, (both_unet, both_te) = _sdlora(base, specs)
    want_unet, want_te = _reference(base, files[kind], weight, plain=(files["plain"], 0.4))
    torch.testing.assert_close(both_unet, want_unet, **TOL)
    torch.testing.assert_close(both_te, want_te, **TOL)
    lyco_name, plain_name = stack.names
    stack.set_weights({lyco_name: (weight, weight)})
    only_lyco = _outputs(stack.pipe.unet, stack.pipe.text_encoder, _inputs(base))[0]
    torch.testing.assert_close(only_lyco, _reference(base, files[kind], weight)[0], **TOL)
    stack.set_weights({plain_name: (0.4, 0.4)})
    only_plain = _outputs(stack.pipe.unet, stack.pipe.text_encoder, _inputs(base))[0]
    for alone in (only_lyco, only_plain):
        assert (both_unet - alone).abs().max() > 1e-2
    if kind == "dora":  # at the 0.7 + 0.4 too: a third result, neither adapter alone nor the 1.0 stack
        stack.set_weights({lyco_name: (0.7, 0.7), plain_name: (0.4, 0.4)})
        at_07 = _outputs(stack.pipe.unet, stack.pipe.text_encoder, _inputs(base))[0]
        for other in (only_lyco, only_plain, both_unet):
            assert (at_07 - other).abs().max() > 1e-2


def test_onetrainer_and_comfyui_names_load_the_same_layers(sd1, tmp_path):
    """The same LoHa under OneTrainer's dotted names (`unet.<module>.hada_w1_a`) and under ComfyUI's (OneTrainer's
    "comfy" output: `diffusion_model.<SGM module>`, `text_encoders.clip_l.transformer.<module>`) reads the same."""
    base, files = sd1
    up_attention = ldm.up_attention(name for name, _ in base.unet.named_modules())
    state = load_file(str(files["loha"]))
    dotted, comfy = {}, {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        component, path = kohya.parse_module_name(name)
        dotted[f"{component}.{path}.{part}"] = value
        comfy_name = (f"diffusion_model.{ldm.to_sgm(path, up_attention_blocks=up_attention)}" if component == "unet"
                      else f"text_encoders.clip_l.transformer.text_model.{path}")
        comfy[f"{comfy_name}.{part}"] = value
    assert any(k.startswith("diffusion_model.input_blocks.1.1.") for k in comfy)
    save_file(dotted, str(tmp_path / "onetrainer.safetensors"))
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    a = formats.read_adapter(files["loha"])
    assert len(list(a.layer_items())) > 30
    for other in (tmp_path / "onetrainer.safetensors", tmp_path / "comfy.safetensors"):
        b = formats.read_adapter(other)
        assert a.layers.keys() == b.layers.keys()
        for component, path, parts in a.layer_items():
            theirs = b.layers[component][path]
            assert parts.keys() == theirs.keys() and all(torch.equal(parts[k], theirs[k]) for k in parts)


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


# ---------------------------------------------------------------------------------------------------------------
# The commands: merge --into-base, generate with <lora:...> tags, grid, info; and the refusals


def test_merge_into_base_bakes_the_stack(sd1, tiny_base, tmp_path):
    base, files = sd1
    loha, plain = files["loha"], files["plain"]
    assert cli.main(["merge", f"{loha}:0.7", f"{plain}:0.4", "--into-base", str(tiny_base),
                     "-o", str(tmp_path / "baked")]) == 0
    baked = load_base_model(str(tmp_path / "baked"))
    want = _reference(base, loha, 0.7, plain=(plain, 0.4))
    got = _outputs(baked.unet, baked.text_encoder, _inputs(base))
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)


def test_merge_into_another_adapter_is_refused_and_writes_nothing(sd1, tmp_path, capsys):
    _, files = sd1
    out = tmp_path / "m.safetensors"
    assert cli.main(["merge", f"{files['loha']}:0.7", f"{files['plain']}:0.4", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loha.safetensors is a loha adapter, which merges only into a base" in err[0]
    assert not out.exists()


def test_generate_with_a_prompt_tag_and_grid(sd1, tiny_base, tmp_path):
    _, files = sd1
    common = ["--base", str(tiny_base), "--steps", "2", "--height", "64", "--width", "64", "--seed", "1"]
    images = {}
    for name, prompt in (("base", "a red circle"), ("tagged", "a red circle <lora:loha:0.7>")):
        out = tmp_path / f"{name}.png"
        assert cli.main(["generate", *common, "--prompt", prompt, "--lora-dir", str(files["loha"].parent),
                         "-o", str(out)]) == 0
        images[name] = np.asarray(Image.open(out).convert("RGB"), np.int16)
    # Generation is deterministic, so any difference is the tag's; 2 steps on the random tiny base keep it small.
    assert np.abs(images["tagged"] - images["base"]).max() > 0
    # a grid over the LoHa's weight (--lora FILE:1, x = weight): its 0 cell is the base, its 0.7 cell the tagged image
    assert cli.main(["grid", *common, "--prompt", "a red circle", "--lora", f"{files['loha']}:1",
                     "--x", "weight:0", "--x-values", "0,0.7", "-o", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    left, top = grid.width - 128, grid.height - 64
    cells = [np.asarray(grid.crop((left + 64 * i, top, left + 64 * i + 64, top + 64)), np.int16) for i in (0, 1)]
    assert np.array_equal(cells[0], images["base"]) and np.array_equal(cells[1], images["tagged"])


def test_info_names_type_rank_alpha_and_options(sd1, tmp_path, capsys):
    _, files = sd1
    assert cli.main(["info", str(files["loha"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "loha" and info["format"] == "lycoris"
    assert info["components"]["unet"]["rank"] == 4 and info["components"]["unet"]["alpha"] == 2.0
    assert info["options"] == {"algo": "loha", "conv_dim": 4, "conv_alpha": 2, "use_tucker": True}
    assert info["options_from"] == "ss_network_args"
    # without a header the options are read off the keys
    save_file(load_file(str(files["dora"])), str(tmp_path / "bare.safetensors"))
    assert cli.main(["info", str(tmp_path / "bare.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["type"] == "dora" and info["options_from"] == "keys"
    assert info["options"]["dora_wd"] is True and info["options"]["wd_on_out"] is True
    assert info["options"]["conv_dim"] == 4 and info["options"]["conv_alpha"] == 2.0
    for kind, want in (("lora", "lora"), ("locon", "locon"), ("lokr", "lokr")):
        assert cli.main(["info", str(files[kind])]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["type"] == want and info["components"]["unet"]["rank"] == 4, (kind, info)
        assert info["components"]["unet"]["alpha"] == 2.0, (kind, info)
    assert info["options"]["factor"] == 4  # the LoKr's own option


def _edited(source, out, edit, metadata=None):
    state = load_file(str(source))
    edit(state)
    save_file(state, str(out), metadata)
    return out


LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("case,source,message", [
    ("mixed", "loha", f"layer {LAYER} ({LAYER}.alpha, {LAYER}.hada_w1_a"),
    ("lokr_inner", "lokr", "impossible LoKr factor shapes"),
    ("dora_missing", "dora", "the header declares DoRA (ss_network_args dora_wd) but this layer has no dora_scale"),
    ("dora_shape", "dora", "dora_scale has shape [3, 1]; DoRA magnitudes are one per output channel"),
    ("partial", "loha", f"layer {LAYER} ({LAYER}.alpha, {LAYER}.hada_w1_a, {LAYER}.hada_w1_b, {LAYER}.hada_w2_a): "
                        "missing hada_w2_b"),
    ("unknown", "loha", "1 key(s) match no known adapter layout"),
])
def test_bad_files_are_refused_in_one_line_and_nothing_is_written(sd1, tmp_path, capsys, case, source, message):
    _, files = sd1
    header = {"ss_network_args": json.dumps({"algo": "lora", "dora_wd": True})} if case == "dora_missing" else None
    edits = {
        "mixed": lambda s: s.__setitem__(f"{LAYER}.lokr_w1", torch.ones(2, 2)),
        "lokr_inner": lambda s: (s.pop(f"{LAYER}.lokr_w2"), s.update({f"{LAYER}.lokr_w2_a": torch.ones(8, 4),
                                                                      f"{LAYER}.lokr_w2_b": torch.ones(3, 8)})),
        "dora_missing": lambda s: [s.pop(k) for k in list(s) if k.endswith(".dora_scale")],
        "dora_shape": lambda s: s.__setitem__(f"{LAYER}.dora_scale", torch.ones(3, 1)),
        "partial": lambda s: s.pop(f"{LAYER}.hada_w2_b"),
        "unknown": lambda s: s.__setitem__(f"{LAYER}.hada_w3", torch.ones(1)),
    }
    bad = _edited(files[source], tmp_path / f"{case}.safetensors", edits[case], header)
    out = tmp_path / "baked"
    assert cli.main(["merge", f"{bad}:1", "--into-base", "sdlora:tiny", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdlora: error: ") and "Traceback" not in err[0]
    assert str(bad) in err[0] and message in err[0], err[0]
    assert not out.exists()


def test_lokr_whose_kronecker_does_not_fit_the_base_is_refused_before_any_weight_changes(sd1, tiny_base, tmp_path,
                                                                                         capsys):
    base, files = sd1
    # both factors well-formed, but 4x4 ⊗ 8x6 is a [32, 24] weight where the layer is [32, 32]
    bad = _edited(files["lokr"], tmp_path / "kron.safetensors",
                  lambda s: (s.update({f"{LAYER}.lokr_w2": torch.ones(8, 6)}),
                             [s.pop(f"{LAYER}.{p}", None) for p in ("lokr_w2_a", "lokr_w2_b")]))
    out = tmp_path / "baked"
    assert cli.main(["merge", f"{bad}:1", "--into-base", str(tiny_base), "-o", str(out)]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("sdlora: error: ")]  # the rest: load progress
    assert len(err) == 1 and "Traceback" not in stderr
    assert "impossible LoKr factor shapes for the base layer [32, 32]: kron of w1 [.., 4] and w2 [.., 6] gives 24 " \
           "inputs, the layer has 32" in err[0], err
    assert str(bad) in err[0] and not out.exists()
    pipe = inference.build_pipeline(copy.deepcopy(base), scheduler="ddim")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="impossible LoKr"):
        inference.stack_adapters(pipe, [inference.AdapterSpec(str(bad), 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_a_lycoris_file_as_lora_init_from_is_refused_not_ignored(sd1):
    from sdlora.config import ConfigError, LoraSection
    from sdlora.training.initial_adapter import load_initial_adapter

    base, files = sd1
    with pytest.raises(ConfigError, match="holds no plain LoRA layers"):
        load_initial_adapter(LoraSection(init_from=files["loha"]), {"unet": base.unet})


def test_preview_adapters_apply_and_then_restore_the_weights_exactly(sd1):
    """sample.adapters during training: a LyCORIS file previews at its weight, and the model is left untouched."""
    base, files = sd1
    pipe = inference.build_pipeline(copy.deepcopy(base), scheduler="ddim")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with inference.preview_adapters(pipe, [inference.AdapterSpec(str(files["lokr"]), 0.7)]):
        inside = _outputs(pipe.unet, pipe.text_encoder, _inputs(base))[0]
    torch.testing.assert_close(inside, _reference(base, files["lokr"], 0.7)[0], **TOL)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_sd2_lycoris_file(tiny_sd2v_base, tmp_path):
    base = load_base_model(str(tiny_sd2v_base))
    path = _write(base, tmp_path / "loha_sd2.safetensors", 5, algo="loha", conv_dim=4, conv_alpha=2)
    want = _reference(base, path)
    got = _sdlora(base, [inference.AdapterSpec(str(path), 1.0)])[2]
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
