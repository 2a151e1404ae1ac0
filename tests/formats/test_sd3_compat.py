"""An SD3 adapter sdlora writes loads in plain diffusers' StableDiffusion3Pipeline and gives sdlora's latents; two
stack at weights as diffusers' set_adapters does; the kohya layout is refused by name."""

from __future__ import annotations

import pytest
import torch

from sdlora import formats, inference
from sdlora.formats import read_adapter
from sdlora.models import load_base_model

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def sd3_adapters(tmp_path_factory, tiny_sd3_base, style_dataset):
    """Two adapters: one with both CLIP encoders trained (rank 4, alpha 8: a lost alpha halves it), one
    transformer-only with the feed-forwards too."""
    from sdlora.config import load_config
    from sdlora.training.run import train

    out = tmp_path_factory.mktemp("sd3-compat")
    common = ["model.base=sdlora:tiny-sd3", f"data.path={style_dataset}", "data.resolution=64", "train.steps=4",
              "train.batch_size=2", "train.learning_rate=5e-2"]
    first = train(load_config(None, [*common, "lora.rank=4", "lora.alpha=8", "lora.train_text_encoder=true",
                                     f"output.dir={out / 'a'}"])).adapter_path
    second = train(load_config(None, [*common, "lora.rank=2", "train.seed=7", f"output.dir={out / 'b'}",
                                      "lora.transformer_targets=[to_q,to_v,ff.net.0.proj,ff_context.net.2]"]))
    return first, second.adapter_path


def _latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator().manual_seed(3), output_type="latent").images


def _diffusers_pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(str(folder))


def _sdlora_pipe():
    return inference.build_pipeline(load_base_model("sdlora:tiny-sd3"))


def test_the_file_is_in_diffusers_sd3_layout(sd3_adapters):
    adapter = read_adapter(sd3_adapters[0])
    assert adapter.components == ["transformer", "text_encoder", "text_encoder_2"]
    assert any(k.endswith("attn.add_q_proj.lora_A.weight") for k in adapter.tensors["transformer"])
    assert any(k.endswith("attn.to_add_out.lora_B.weight") for k in adapter.tensors["transformer"])
    # alpha / r is folded into lora_B (ComfyUI reads no header alpha): the file says alpha = r, and no .alpha keys
    assert adapter.shapes["transformer"].alpha == 4.0 and adapter.metadata["sdlora.alpha"] == "8.0"
    assert not any(k.endswith(".alpha") for k in adapter.tensors["transformer"])
    info = formats.describe(sd3_adapters[0])
    assert info["components"]["transformer"]["rank"] == 4


def test_diffusers_loads_the_file_and_gives_sdlora_s_latents(sd3_adapters, tiny_sd3_base):
    path = sd3_adapters[0]
    pipe = _diffusers_pipe(tiny_sd3_base)
    base_latents = _latents(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="a")
    theirs = _latents(pipe)

    ours_pipe = _sdlora_pipe()
    inference.stack_adapters(ours_pipe, [inference.AdapterSpec(str(path), 1.0)])
    ours = _latents(ours_pipe)
    difference = (theirs - ours).abs().max().item()
    print(f"SD3 adapter, diffusers vs sdlora latents: max |difference| = {difference:.3g}")
    assert difference <= 1e-5
    assert (theirs - base_latents).abs().max() > 1e-2  # the adapter does change the result


def test_two_adapters_stack_at_weights_as_diffusers_set_adapters(sd3_adapters, tiny_sd3_base):
    first, second = sd3_adapters
    weights = (0.7, 0.4)
    pipe = _diffusers_pipe(tiny_sd3_base)
    pipe.load_lora_weights(str(first.parent), weight_name=first.name, adapter_name="a")
    pipe.load_lora_weights(str(second.parent), weight_name=second.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], list(weights))
    theirs = _latents(pipe)

    ours_pipe = _sdlora_pipe()
    inference.stack_adapters(ours_pipe, [inference.AdapterSpec(str(first), weights[0]),
                                         inference.AdapterSpec(str(second), weights[1])])
    ours = _latents(ours_pipe)
    difference = (theirs - ours).abs().max().item()
    print(f"two SD3 adapters at {weights}, diffusers vs sdlora latents: max |difference| = {difference:.3g}")
    assert difference <= 1e-5

    alone = _sdlora_pipe()
    inference.stack_adapters(alone, [inference.AdapterSpec(str(first), weights[0])])
    assert (_latents(alone) - ours).abs().max() > 1e-3  # the second adapter counts


def test_kohya_layout_is_refused_naming_the_way_out(sd3_adapters, tmp_path):
    with pytest.raises(formats.AdapterFormatError, match="diffusers layout only.*--to diffusers"):
        formats.convert(sd3_adapters[0], tmp_path / "k.safetensors", "kohya")
    assert not (tmp_path / "k.safetensors").exists()


def test_a_flow_base_refuses_a_ddpm_scheduler():
    with pytest.raises(inference.GenerationSettingError, match="--scheduler: ddim cannot sample this sd3 base"):
        inference.build_pipeline(load_base_model("sdlora:tiny-sd3"), scheduler="ddim")


def test_folding_alpha_keeps_every_module_s_update():
    from sdlora.formats import AdapterFile, fold_alpha
    from sdlora.inference.merge import delta
    from sdlora.models.lora import AdapterShape

    torch.manual_seed(0)
    tensors = {"a.to_q.lora_A.weight": torch.randn(4, 6), "a.to_q.lora_B.weight": torch.randn(5, 4),
               "b.to_k.lora_A.weight": torch.randn(2, 6), "b.to_k.lora_B.weight": torch.randn(5, 2)}
    shape = AdapterShape(4, 8.0, ("a.to_q", "b.to_k"), rank_pattern={"b.to_k": 2}, alpha_pattern={"b.to_k": 3.0})
    adapter = AdapterFile({"transformer": tensors}, {"transformer": shape})
    folded = fold_alpha(adapter)
    for module in ("a.to_q", "b.to_k"):
        assert torch.allclose(delta(folded, "transformer", module), delta(adapter, "transformer", module))
        # what ComfyUI computes without an .alpha key: B @ A at scale 1
        raw = folded.tensors["transformer"][f"{module}.lora_B.weight"] @ folded.tensors["transformer"][
            f"{module}.lora_A.weight"]
        assert torch.allclose(raw, delta(adapter, "transformer", module))


def test_generate_info_and_prompt_tags_work_on_sd3_adapters(sd3_adapters, tmp_path, capsys):
    from PIL import Image

    from sdlora import cli

    first, second = sd3_adapters
    image = tmp_path / "gen.png"
    # The base comes from the adapter's header (sdlora:tiny-sd3); the second adapter through a <lora:...> tag.
    assert cli.main(["generate", "--lora", f"{first}:0.8", "--lora-dir", str(second.parent), "--prompt",
                     f"a red circle <lora:{second.stem}:0.5>", "--steps", "2", "--height", "64", "--width", "64",
                     "--fuse", "-o", str(image)]) == 0
    assert Image.open(image).size == (64, 64)
    assert cli.main(["info", str(first)]) == 0
    assert '"transformer"' in capsys.readouterr().out


def test_baking_an_sd3_adapter_into_the_base_equals_stacking_it(sd3_adapters):
    from sdlora.inference import merge

    adapter = read_adapter(sd3_adapters[0])
    base = load_base_model("sdlora:tiny-sd3")
    assert merge.bake_into({base.denoiser_component: base.unet, **base.text_encoders}, adapter) > 0
    baked = _latents(inference.build_pipeline(base))
    stacked_pipe = _sdlora_pipe()
    inference.stack_adapters(stacked_pipe, [inference.AdapterSpec(str(sd3_adapters[0]), 1.0)])
    assert (baked - _latents(stacked_pipe)).abs().max() < 1e-4


def test_merging_two_sd3_adapters_generates_like_stacking_them(sd3_adapters, tmp_path):
    """`sdlora merge` of two SD3 files (different ranks and targets, one with the CLIPs trained): without a base, an
    SD3 adapter whose latents equal the two stacked at the same weights; with --into-base, a folder that does too."""
    from sdlora import cli

    first, second = sd3_adapters
    merged = tmp_path / "merged.safetensors"
    assert cli.main(["merge", f"{first}:0.8", f"{second}:0.5", "-o", str(merged)]) == 0
    adapter = read_adapter(merged)
    assert adapter.components == ["transformer", "text_encoder", "text_encoder_2"]
    assert any(k.endswith("ff.net.0.proj.lora_A.weight") for k in adapter.tensors["transformer"])  # second's only
    from_merge, stacked = _sdlora_pipe(), _sdlora_pipe()
    inference.stack_adapters(from_merge, [inference.AdapterSpec(str(merged), 1.0)])
    inference.stack_adapters(stacked, [inference.AdapterSpec(str(first), 0.8), inference.AdapterSpec(str(second), 0.5)])
    expected = _latents(stacked)
    difference = (_latents(from_merge) - expected).abs().max()
    assert difference < 1e-4, difference
    # The same two baked into the base: a diffusers SD3 folder that loads back and generates the same latents.
    folder = tmp_path / "baked"
    assert cli.main(["merge", f"{first}:0.8", f"{second}:0.5", "--into-base", "sdlora:tiny-sd3",
                     "-o", str(folder)]) == 0
    baked = load_base_model(str(folder))
    assert baked.family == "sd3"
    assert (_latents(inference.build_pipeline(baked)) - expected).abs().max() < 1e-4


def test_grid_over_an_sd3_adapter_weight_matches_generate(sd3_adapters, tmp_path):
    """`sdlora grid` on an SD3 adapter: each cell is the image `sdlora generate` makes at that weight."""
    import numpy as np
    from PIL import Image

    from sdlora import cli

    first = sd3_adapters[0]
    common = ["--prompt", PROMPT, "--steps", "2", "--height", "64", "--width", "64", "--seed", "5"]
    grid_path = tmp_path / "grid.png"
    assert cli.main(["grid", *common, "--lora", f"{first}:1", "--x", "weight:0", "--x-values", "0,1",
                     "-o", str(grid_path)]) == 0
    grid = Image.open(grid_path).convert("RGB")
    left, top = grid.width - 2 * 64, grid.height - 64  # labels in the left and top margins
    cells = [np.asarray(grid.crop((left + 64 * x, top, left + 64 * x + 64, top + 64)), np.int16) for x in range(2)]
    for weight, cell in zip((0, 1), cells):
        out = tmp_path / f"cell{weight}.png"
        assert cli.main(["generate", *common, "--lora", f"{first}:{weight}", "-o", str(out)]) == 0
        assert np.array_equal(cell, np.asarray(Image.open(out).convert("RGB"), np.int16)), weight
    assert np.abs(cells[0] - cells[1]).max() > 0  # the adapter changes the image


def test_an_sd3_adapter_on_an_sdxl_base_is_refused_by_family(sd3_adapters, tiny_sdxl_base):
    """Both have two CLIP encoders: the base's transformer, not its encoders, says SD3 (base_family once said SDXL
    for every two-encoder base, and refused SD3 adapters on their own base)."""
    from sdlora.formats.validate import base_family
    from sdlora.models import lora

    sd3_base = load_base_model("sdlora:tiny-sd3")
    assert base_family({"transformer": sd3_base.unet, **sd3_base.text_encoders}) == "sd3"
    pipe = inference.build_pipeline(load_base_model(str(tiny_sdxl_base)))
    with pytest.raises(lora.AdapterMismatchError, match="made for SD3 .* but the base is SDXL"):
        inference.stack_adapters(pipe, [inference.AdapterSpec(str(sd3_adapters[0]), 1.0)])
