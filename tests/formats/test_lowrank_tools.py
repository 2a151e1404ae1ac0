"""`sdlora resize`, `convert --to lora` and `extract`: each layer's update re-factored by SVD, with the errors
they print checked against an independent recomputation from the raw files, and the results loaded in diffusers."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdlora.cli import main


def _name(layer: str) -> str:
    """One spelling for a layer in either layout: `unet.down_blocks.0...` and `lora_unet_down_blocks_0...` alike."""
    return layer.removeprefix("lora_").replace(".", "_")


def _raw_updates(path) -> dict[str, torch.Tensor]:
    """layer (`_name`) -> (alpha / r) * B @ A, flattened, read with safetensors alone from a file in either layout."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    config = json.loads(header.get("lora_adapter_metadata", "{}"))
    out = {}
    for key, down in tensors.items():
        match = re.match(r"^(.+)\.(lora_A|lora_down)\.weight$", key)
        if not match:
            continue
        module, rank = match[1], down.shape[0]
        up = tensors[f"{module}.{'lora_B' if match[2] == 'lora_A' else 'lora_up'}.weight"]
        if f"{module}.alpha" in tensors:
            alpha = float(tensors[f"{module}.alpha"])
        else:
            alpha = config.get(f"{module.split('.')[0]}.lora_alpha", rank)
        out[_name(module)] = (alpha / rank) * up.double().reshape(up.shape[0], -1) @ down.double().reshape(rank, -1)
    return out


def _diffusers_image(base, adapter=None):
    """What plain diffusers renders (float RGB) on `base`, with `adapter` loaded by `load_lora_weights`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    return pipe("a red circle on a blue background", num_inference_steps=3, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]


def _sdlora_image(base, adapter):
    from sdlora import inference
    from sdlora.models import load_base_model

    pipe = inference.build_pipeline(load_base_model(str(base)), scheduler="ddim")
    inference.stack_adapters(pipe, [inference.AdapterSpec(str(adapter), 1.0)])
    image = inference.generate(pipe, "a red circle on a blue background", seed=3, steps=3, guidance_scale=5.0)[0]
    return np.asarray(image, dtype=np.float32) / 255.0


def _error_line(capsys) -> str:
    """The one `sdlora: error:` line, last on stderr (loading bars may come before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sdlora: error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def _table(text: str) -> dict[str, tuple[str, float]]:
    """layer -> (rank column, error) from the printed table."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^(\S+)\s+(\S+ -> \d+)\s+(\S+)$", line)
        if match:
            rows[_name(match[1])] = (match[2], float(match[3]))
    return rows


@pytest.fixture(scope="module")
def tiny_unet(tiny_base):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_base), subfolder="unet")


@pytest.fixture(scope="module")
def rank16(tmp_path_factory, tiny_unet):
    """A rank-16 LoRA (alpha 8) on the tiny UNet's attention and 1x1 projection convs, kohya layout."""
    from adapter_factory import make_adapter

    from sdlora.formats import save_kohya

    adapter = make_adapter(tiny_unet, rank=16, alpha=8.0, unet_targets=("to_q", "to_v", "proj_in", "ff.net.2"))
    return save_kohya(tmp_path_factory.mktemp("resize") / "r16.safetensors", adapter)


def test_resize_16_to_4_keeps_every_layer_within_its_reported_error(rank16, tmp_path, capsys):
    out = tmp_path / "r4.safetensors"
    assert main(["resize", str(rank16), str(out), "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    reported = _table(printed)
    before, after = _raw_updates(rank16), _raw_updates(out)
    assert set(after) == set(before) == set(reported) and len(before) >= 8
    residual = total = 0.0
    for module, delta in before.items():
        rank_column, error = reported[module]
        assert rank_column == "16 -> 4"
        measured = float((delta - after[module]).norm() / delta.norm())
        # the printed value is the error (3 significant digits), and the best any rank-4 LoRA can do
        assert measured == pytest.approx(error, rel=2e-3)
        singular = torch.linalg.svdvals(delta)
        assert measured == pytest.approx(float(singular[4:].norm() / singular.norm()), rel=1e-6)
        residual, total = residual + float((delta - after[module]).norm()) ** 2, total + float(delta.norm()) ** 2
    overall = float(re.search(r"^overall\s+(\S+)", printed, re.M)[1])
    assert (residual / total) ** 0.5 == pytest.approx(overall, rel=2e-3)
    header = safe_open(str(out), framework="pt").metadata()
    record = json.loads(header["sdlora.resize"])
    assert record["from_rank"] == "16" and record["rank"] == 4
    assert header["ss_network_dim"] == "4" and "from rank 16 to rank 4" in header["ss_training_comment"]


def test_resize_to_a_target_error_meets_it_with_the_smallest_rank(rank16, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["resize", str(rank16), str(out), "--error", "0.3", "--to", "diffusers"]) == 0
    before, after = _raw_updates(rank16), _raw_updates(out)
    ranks = set()
    for module, delta in before.items():
        mine = after[module]
        measured = float((delta - mine).norm() / delta.norm())
        singular = torch.linalg.svdvals(delta)
        rank = int(torch.linalg.matrix_rank(mine, rtol=1e-6))
        assert measured <= 0.3 + 1e-6
        assert float(singular[rank - 1:].norm() / singular.norm()) > 0.3  # one rank less would miss it
        ranks.add(rank)
    assert len(ranks) > 1 or ranks != {16}  # per layer, not one rank for all


def test_convert_to_lora_loads_in_plain_diffusers_with_the_same_image(rank16, tiny_base, tmp_path, capsys):
    """A LoRA at full rank converts exactly: plain diffusers with the converted file gives sdlora's image with the
    original kohya file (which diffusers would have to convert itself)."""
    out = tmp_path / "plain.safetensors"
    assert main(["convert", str(rank16), str(out), "--to", "lora", "--rank", "16"]) == 0
    printed = capsys.readouterr().out
    assert float(re.search(r"^overall\s+(\S+)", printed, re.M)[1]) < 1e-6
    assert all(error < 1e-6 for _, error in _table(printed).values())
    theirs = _diffusers_image(tiny_base, out)
    assert np.abs(theirs - _sdlora_image(tiny_base, rank16)).max() <= 1.5 / 255
    assert np.abs(theirs - _diffusers_image(tiny_base)).max() > 10 / 255, "the adapter changed nothing"


def test_bad_rank_options_are_one_line_and_write_nothing(rank16, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    for argv, said in (
        (["resize", rank16, out], "give --rank R (a fixed rank) or --error E"),
        (["resize", rank16, out, "--error", "1.5"], "--error 1.5: give a relative error between 0 and 1"),
        (["convert", rank16, out, "--to", "kohya", "--rank", "4"], "--rank, --error and --base only go with --to lora"),
        (["convert", rank16, out, "--to", "lora", "--rank", "0"], "the rank must be at least 1"),
    ):
        assert main([str(a) for a in argv]) == 2
        assert said in _error_line(capsys)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# extract


CHANGED = {  # UNet weight -> the rank-2 change added to it
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": 0,
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": 1,
    "up_blocks.1.attentions.0.proj_out.weight": 2,  # a 1x1 convolution in SD1's transformer blocks
    "down_blocks.0.resnets.0.conv1.weight": 3,  # a 3x3 ResNet convolution: LoCon
}


TE_CHANGED = "encoder.layers.1.self_attn.v_proj.weight"  # `text_model.` before it under transformers < 5


def _add_low_rank(weights, keys, generator) -> dict[str, torch.Tensor]:
    """Add a random rank-2 change to each of `keys` in a safetensors file; module -> the change."""
    state = load_file(str(weights))
    changes = {}
    for key in keys:
        flat = state[key].reshape(state[key].shape[0], -1)
        change = torch.randn(flat.shape[0], 2, generator=generator) @ torch.randn(2, flat.shape[1], generator=generator)
        changes[key.removesuffix(".weight")] = (change * 0.05).reshape(state[key].shape)
        state[key] = state[key] + changes[key.removesuffix(".weight")]
    save_file(state, str(weights), metadata={"format": "pt"})
    return changes


@pytest.fixture(scope="module")
def tuned(tiny_base, tmp_path_factory):
    """A copy of the tiny base with a known rank-2 change added to four UNet layers and one text-encoder layer;
    (folder, {layer: change})."""
    folder = tmp_path_factory.mktemp("tuned") / "pipe"
    shutil.copytree(tiny_base, folder)
    generator = torch.Generator().manual_seed(7)
    changes = _add_low_rank(folder / "unet" / "diffusion_pytorch_model.safetensors", CHANGED, generator)
    changes = {f"unet.{k}": v for k, v in changes.items()}
    te_file = folder / "text_encoder" / "model.safetensors"
    with safe_open(str(te_file), framework="pt") as handle:
        key = next(k for k in handle.keys() if k.endswith(TE_CHANGED))
    te = _add_low_rank(te_file, [key], generator)
    return folder, {**changes, **{f"text_encoder.{k.removeprefix('text_model.')}": v for k, v in te.items()}}


def test_extract_recovers_a_known_low_rank_change_and_generates_as_the_tuned_base(tiny_base, tuned, tmp_path,
                                                                                  capsys):
    folder, changes = tuned
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", str(tiny_base), str(folder), str(out), "--rank", "2", "--conv-rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "left out" not in printed  # the text encoder changed (by more than --min-diff): it is extracted too
    updates = _raw_updates(out)
    assert set(updates) == {_name(m) for m in changes}  # only the changed layers, all five of them
    for module, change in changes.items():
        error = float((updates[_name(module)] - change.double().reshape(change.shape[0], -1)).norm() / change.norm())
        assert error < 1e-4, (module, error)
    assert float(re.search(r"^overall\s+(\S+)", printed, re.M)[1]) < 1e-4
    extracted = _diffusers_image(tiny_base, out)
    tuned_image = _diffusers_image(folder)
    assert np.abs(extracted - tuned_image).max() < 1e-4
    assert np.abs(tuned_image - _diffusers_image(tiny_base)).max() > 5 / 255, "the change is too small to test"


def test_extract_leaves_out_a_text_encoder_that_moved_less_than_min_diff(tiny_base, tuned, tmp_path, capsys):
    folder, changes = tuned
    out = tmp_path / "unet-only.safetensors"
    assert main(["extract", str(tiny_base), str(folder), str(out), "--rank", "2", "--min-diff", "10",
                 "--to", "kohya"]) == 0
    assert "text_encoder left out: no weight moved by more than --min-diff 10" in capsys.readouterr().out
    keys = load_file(str(out))
    assert not [k for k in keys if k.startswith("lora_te") or "resnets" in k] and len(keys) == 3 * 3
    assert len(_raw_updates(out)) == 3  # no --conv-rank: the 3x3 ResNet convolution is not extracted


def test_extract_refuses_different_architectures_in_one_line(tiny_base, tiny_sd2v_base, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(tiny_base), str(tiny_sd2v_base), str(out), "--rank", "2"]) == 2
    line = _error_line(capsys)
    assert "same architecture" in line and str(tiny_sd2v_base) in line
    assert not out.exists()


def test_extract_on_sdxl_writes_kohya_names_that_read_back_to_the_change(tiny_sdxl_base, tmp_path, capsys):
    """SDXL: UNet layers get SGM names (`lora_unet_output_blocks_…`), the second text encoder `lora_te2_…`, and
    reading the kohya file back gives each known change."""
    from sdlora.formats import read_adapter

    folder = tmp_path / "tuned-xl"
    shutil.copytree(tiny_sdxl_base, folder)
    generator = torch.Generator().manual_seed(11)
    unet = _add_low_rank(folder / "unet" / "diffusion_pytorch_model.safetensors",
                         ["up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"], generator)
    te2_file = folder / "text_encoder_2" / "model.safetensors"
    with safe_open(str(te2_file), framework="pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    te2 = _add_low_rank(te2_file, [key], generator)
    out = tmp_path / "xl.safetensors"
    assert main(["extract", str(tiny_sdxl_base), str(folder), str(out), "--rank", "2", "--to", "kohya"]) == 0
    capsys.readouterr()
    keys = set(load_file(str(out)))
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    adapter = read_adapter(out)
    for component, changes in (("unet", unet), ("text_encoder_2", te2)):
        (module, change), = changes.items()
        a = adapter.tensors[component][f"{module}.lora_A.weight"].double()
        b = adapter.tensors[component][f"{module}.lora_B.weight"].double()
        scale = adapter.shapes[component].alpha / a.shape[0]
        assert float((scale * b @ a - change.double()).norm() / change.norm()) < 1e-4
