"""`sdlora convert --to lora` of files the lycoris-lora package writes (LoCon, LoHa, LoKr, DoRA) on the tiny base:
the printed errors match a recomputation from the raw files, and the converted file, loaded by plain diffusers'
`load_lora_weights`, gives the UNet and text-encoder outputs LyCORIS gives applying the original."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file

from sdlora.cli import main
from sdlora.formats import kohya
from sdlora.models import load_base_model

lk = pytest.importorskip("lycoris.kohya")

TYPES = {  # create_network options: conv layers on, so LoCon-style convolutions are converted too
    "locon": {"algo": "lora", "conv_dim": 4, "conv_alpha": 2},
    "loha": {"algo": "loha", "conv_dim": 4, "conv_alpha": 2},
    "lokr": {"algo": "lokr", "factor": 4, "conv_dim": 4, "conv_alpha": 2, "decompose_both": True},
    "dora": {"algo": "lora", "dora_wd": True, "conv_dim": 4, "conv_alpha": 2},
}
PRESET = {"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                                      "Upsample2D"],
          "unet_target_name": [], "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
          "text_encoder_target_name": []}


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory):
    """Each type written by LyCORIS itself, with random non-zero weights (DoRA magnitudes near the base's norms)."""
    lk.PRESET["sdlora-convert"] = PRESET
    base = load_base_model(str(tiny_base))
    folder = tmp_path_factory.mktemp("lyco-convert")
    out = {}
    try:
        for seed, (kind, options) in enumerate(TYPES.items()):
            unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
            network = lk.create_network(1.0, 4, 2.0, None, te, unet, preset="sdlora-convert", **options)
            network.apply_to(te, unet, True, True)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, param in network.named_parameters():
                    if name.endswith("dora_scale"):
                        param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
                    else:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
            out[kind] = folder / f"{kind}.safetensors"
            args = str(options).replace("'", '"').replace("True", "true")
            # the header names the family, as kohya and LyCORIS trainers write it: SD1's proj_in/proj_out are 1x1
            # convolutions, which a flattened LoHa/LoKr layer does not say by itself
            network.save_weights(str(out[kind]), torch.float32, {"ss_network_args": args,
                                                                 "ss_base_model_version": "sd_v1"})
    finally:
        del lk.PRESET["sdlora-convert"]
    return base, out


@pytest.fixture(scope="module")
def pipe(tiny_base):
    """Plain diffusers, loaded once: each test loads its converted file as a named adapter and deletes it after."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)


def _inputs(base):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, base.unet.config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 6, base.unet.config.cross_attention_dim, generator=generator)
    ids = torch.randint(0, base.text_encoder.config.vocab_size, (1, 6), generator=generator)
    return latents, hidden, ids


def _outputs(unet, encoder, inputs):
    latents, hidden, ids = inputs
    with torch.no_grad():
        return unet(latents, 10, hidden).sample, encoder(ids)[0]


def _lycoris_reference(base, path):
    """What LyCORIS makes of the file: (`component.module` -> ΔW flattened, from the modules it builds: the weight
    its forward adds, `make_weight`/`get_weight` scaled once (its `merge_to` scales LoHa/LoKr twice, so it is not
    used), DoRA through its own `apply_weight_decompose`; and the UNet / text-encoder outputs with it applied)."""
    from lycoris.modules.locon import LoConModule

    unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    network, _ = lk.create_network_from_weights(1.0, str(path), None, te, unet, for_inference=True)
    out = {}
    with torch.no_grad():
        for module in network.unet_loras + network.text_encoder_loras:
            weight = module.org_module[0].weight.float()
            if isinstance(module, LoConModule):
                diff = module.make_weight() * module.scale
            else:
                diff = module.get_weight(module.shape) * module.scalar
            diff = diff.reshape(weight.shape)
            if module.wd:
                diff = module.apply_weight_decompose(weight + diff, 1.0) - weight
            component, name = kohya.parse_module_name(module.lora_name)
            out[f"{component}.{name}"] = diff.double().reshape(weight.shape[0], -1)
    network.apply_to(te, unet, True, True)
    return out, _outputs(unet, te, _inputs(base))


def _converted_updates(path) -> dict[str, torch.Tensor]:
    """`component.module` -> B @ A (alpha = rank in what convert writes; asserted), flattened, from the raw file."""
    tensors = load_file(str(path))
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = tensors[f"{module}.lora_B.weight"]
            out[module] = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return out


@pytest.mark.parametrize("kind", list(TYPES))
def test_convert_reports_each_layers_error_and_plain_diffusers_matches_lycoris(files, pipe, tiny_base, tmp_path,
                                                                                 capsys, kind):
    base, paths = files
    # 1. at rank 2 the printed errors are the measured ones, against ΔW as LyCORIS applies it
    low = tmp_path / "low.safetensors"
    base_option = ["--base", str(tiny_base)] if kind == "dora" else []  # only a DoRA needs the base's weights
    assert main(["convert", str(paths[kind]), str(low), "--to", "lora", "--rank", "2", *base_option]) == 0
    printed = capsys.readouterr().out
    rows = {m[1]: float(m[2]) for m in re.finditer(r"^(\S+)\s+.+? -> \d+\s+(\S+)$", printed, re.M)}
    (references, reference_outputs), ours = _lycoris_reference(base, paths[kind]), _converted_updates(low)
    assert set(rows) == set(ours) == set(references) and len(rows) > 20
    residual = total = 0.0
    for layer, reference in references.items():
        gap = float((reference - ours[layer]).norm())
        assert gap / float(reference.norm()) == pytest.approx(rows[layer], rel=2e-3, abs=1e-6), layer
        residual, total = residual + gap ** 2, total + float(reference.norm()) ** 2
    overall = float(re.search(r"^overall\s+(\S+)", printed, re.M)[1])
    assert (residual / total) ** 0.5 == pytest.approx(overall, rel=2e-3)
    assert overall > 1e-3  # rank 2 is lossy for these: the table is not trivially zero

    # 2. at a tight error target the plain LoRA is the adapter: diffusers' outputs equal LyCORIS' own (a LoCon goes
    # the plain LoRA path, whose diffusers load test_lowrank_tools.py checks)
    if kind == "locon":
        return
    exact = tmp_path / "exact.safetensors"
    assert main(["convert", str(paths[kind]), str(exact), "--to", "lora", "--error", "1e-5", *base_option]) == 0
    capsys.readouterr()
    pipe.load_lora_weights(str(exact.parent), weight_name=exact.name, adapter_name=kind)
    try:
        theirs = _outputs(pipe.unet, pipe.text_encoder, _inputs(base))
    finally:
        pipe.delete_adapters(kind)
    plain = _outputs(base.unet, base.text_encoder, _inputs(base))
    for got, want, before in zip(theirs, reference_outputs, plain):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), float((got - want).abs().max())
        assert float((want - before).abs().max()) > 1e-2, "the adapter changed nothing"


def test_dora_without_base_is_one_line_and_writes_nothing(files, tmp_path, capsys):
    _, paths = files
    out = tmp_path / "d.safetensors"
    assert main(["convert", str(paths["dora"]), str(out), "--to", "lora", "--rank", "4"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sdlora: error:")]
    assert len(lines) == 1 and "needs --base BASE" in lines[0] and str(paths["dora"]) in lines[0], err
    assert not out.exists()


def test_a_flattened_conv_of_unknown_kernel_asks_for_the_base(files, tiny_base, tmp_path, capsys):
    """Without a family in the header (and a cross-attention width no real family has), SD1's 1x1 proj_in stored
    flattened by LoHa could be a Linear: refused, naming the layer and --base; with --base it converts to 1x1."""
    from safetensors.torch import save_file

    _, paths = files
    bare = tmp_path / "loha_bare.safetensors"
    save_file(load_file(str(paths["loha"])), str(bare))
    out = tmp_path / "plain.safetensors"
    assert main(["convert", str(bare), str(out), "--to", "lora", "--rank", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdlora: error:")]
    assert len(err) == 1 and "proj_" in err[0] and "pass --base BASE" in err[0], err
    assert not out.exists()
    assert main(["convert", str(bare), str(out), "--to", "lora", "--rank", "2", "--base", str(tiny_base)]) == 0
    proj = {k: v for k, v in load_file(str(out)).items() if "proj_in.lora_A" in k}
    assert proj and all(v.dim() == 4 and v.shape[2:] == (1, 1) for v in proj.values())
