"""merge (exact, SVD re-rank, into a base), grid cells equal to separate generate calls, convert and info."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapter_factory import make_adapter
from PIL import Image
from safetensors import safe_open

from sdlora import cli, formats, inference
from sdlora.inference import merge
from sdlora.models import load_base_model


@pytest.fixture(scope="module")
def pair(tiny_base, tmp_path_factory):
    base = load_base_model(str(tiny_base))
    folder = tmp_path_factory.mktemp("pair")
    a = formats.save_diffusers(folder / "a.safetensors", make_adapter(base.unet, base.text_encoder, seed=1, alpha=8))
    b = formats.save_kohya(folder / "b.safetensors", make_adapter(base.unet, None, seed=2, rank=2, alpha=1))
    return a, b


def test_merge_is_exact_and_rerank_is_the_best_approximation(pair):
    a, b = (formats.read_adapter(p) for p in pair)
    merged = merge.merge_adapters([(a, 0.6), (b, 0.4)])
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    want = 0.6 * merge.delta(a, "unet", module) + 0.4 * merge.delta(b, "unet", module)
    assert merged.shapes["unet"].rank == 6 and merged.shapes["unet"].alpha == 6.0
    torch.testing.assert_close(merge.delta(merged, "unet", module), want, rtol=0, atol=1e-6)
    te_module = "encoder.layers.0.self_attn.q_proj"
    torch.testing.assert_close(merge.delta(merged, "text_encoder", te_module), 0.6 * merge.delta(a, "text_encoder", te_module))
    reranked = merge.merge_adapters([(a, 0.6), (b, 0.4)], rank=3)
    assert reranked.shapes["unet"].rank == 3
    s = torch.linalg.svdvals(want.double())
    error = torch.linalg.matrix_norm(merge.delta(reranked, "unet", module).double() - want.double())
    torch.testing.assert_close(error, s[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart-Young optimum


def test_merged_file_generates_like_the_stack(tiny_base, pair, tmp_path):
    a, b = pair
    assert cli.main(["merge", f"{a}:0.6", f"{b}:0.4", "-o", str(tmp_path / "m.safetensors")]) == 0
    images = []
    for specs in ([inference.AdapterSpec(str(a), 0.6), inference.AdapterSpec(str(b), 0.4)],
                  [inference.AdapterSpec(str(tmp_path / "m.safetensors"), 1.0)]):
        pipe = inference.build_pipeline(load_base_model(str(tiny_base)))
        inference.stack_adapters(pipe, specs)
        images.append(np.asarray(inference.generate(pipe, "a red circle", steps=3)[0], np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1

    assert cli.main(["merge", f"{a}:0.6", f"{b}:0.4", "--into-base", str(tiny_base), "-o", str(tmp_path / "baked")]) == 0
    baked = inference.build_pipeline(load_base_model(str(tmp_path / "baked")))
    assert np.abs(np.asarray(inference.generate(baked, "a red circle", steps=3)[0], np.int16) - images[0]).max() <= 1

    # The same bake as one A1111 / ComfyUI file: it loads back (diffusers' from_single_file) to the same weights.
    single = tmp_path / "baked.safetensors"
    assert cli.main(["merge", f"{a}:0.6", f"{b}:0.4", "--into-base", str(tiny_base), "-o", str(single)]) == 0
    assert any(key.startswith("model.diffusion_model.") for key in safe_open(single, "pt").keys())
    from_file = load_base_model(str(single), single_file_config=str(tiny_base))
    for name, value in baked.unet.state_dict().items():
        assert torch.equal(from_file.unet.state_dict()[name], value), name


def _cell(grid, index, columns, rows):
    """Cell `index` of a grid of 64 px cells: the labels take the left and top margins, the cells the rest."""
    left, top = grid.width - columns * 64, grid.height - len(rows) * 64
    y, x = divmod(index, columns)
    return np.asarray(grid.crop((left + 64 * x, top + 64 * y, left + 64 * x + 64, top + 64 * y + 64)), np.int16)


def test_grid_cells_equal_separate_generate_calls(tiny_base, pair, tmp_path):
    a, b = pair
    common = ["--base", str(tiny_base), "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64",
              "--seed", "5"]
    assert cli.main(["grid", *common, "--lora", f"{a}:1", "--lora", f"{b}:1", "--x", "weight:0", "--x-values",
                     "0:1:1", "--y", "weight:1", "--y-values", "0,1", "-o", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    rows = ["#1 0", "#1 1"]
    cells = [_cell(grid, i, 2, rows) for i in range(4)]
    for index, (wb, wa) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        out = tmp_path / f"cell{index}.png"
        assert cli.main(["generate", *common, "--lora", f"{a}:{wa}", "--lora", f"{b}:{wb}", "-o", str(out)]) == 0
        assert np.array_equal(cells[index], np.asarray(Image.open(out).convert("RGB"), np.int16)), index
    assert np.abs(cells[0] - cells[3]).max() > 10
    # labels are drawn in the margins: the grid is bigger than its cells
    assert grid.size[0] > 128 and grid.size[1] > 128


def test_generate_fuse_matches_unfused(tiny_base, pair, tmp_path):
    a, b = pair
    common = ["--base", str(tiny_base), "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64",
              "--lora", f"{a}:0.8", "--lora", f"{b}:0.5"]
    assert cli.main(["generate", *common, "-o", str(tmp_path / "unfused.png")]) == 0
    assert cli.main(["generate", *common, "--fuse", "-o", str(tmp_path / "fused.png")]) == 0
    assert cli.main(["generate", *common[:-4], "-o", str(tmp_path / "base.png")]) == 0
    unfused, fused, base = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.int16) for n in ("unfused", "fused", "base"))
    assert np.abs(fused - unfused).max() <= 1
    assert np.abs(fused - base).max() > 10


def test_convert_and_info_commands(pair, tmp_path, capsys):
    a, _ = pair
    assert cli.main(["convert", str(a), str(tmp_path / "k.safetensors"), "--to", "kohya", "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "k.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["components"]["unet"]["dtype"] == "bfloat16"
    assert info["components"]["unet"]["alpha"] == 8.0
    assert info["metadata"]["ss_network_module"] == "networks.lora"
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert cli.main(["info", str(tmp_path / "bad.safetensors")]) == 2
    assert "truncated: 4 bytes, shorter than the 8-byte header length" in capsys.readouterr().err


def test_merge_of_different_coverage_keeps_one_alpha(tiny_base):
    base = load_base_model(str(tiny_base))
    a = make_adapter(base.unet, None, seed=3, rank=4, alpha=2, unet_targets=("to_q",))
    b = make_adapter(base.unet, None, seed=4, rank=2, alpha=2)
    merged = merge.merge_adapters([(a, 1.0), (b, 0.5)])
    shape = merged.shapes["unet"]
    assert shape.alpha_pattern == {} and shape.rank == 2 and shape.alpha == 2.0
    q, k = (f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{m}" for m in ("to_q", "to_k"))
    assert shape.rank_pattern[q] == 6
    torch.testing.assert_close(merge.delta(merged, "unet", q), merge.delta(a, "unet", q) + 0.5 * merge.delta(b, "unet", q))
    torch.testing.assert_close(merge.delta(merged, "unet", k), 0.5 * merge.delta(b, "unet", k))


def test_info_names_the_sources_of_a_merge(pair, tmp_path, capsys):
    """`merge a:0.8 b:1.0` then `info`: the sources read `a:0.8, b:1`, not `?:0.8, ?:1.0` (issue 18, item 8)."""
    a, b = pair
    merged = tmp_path / "merged.safetensors"
    assert cli.main(["merge", f"{a}:0.8", f"{b}:1.0", "-o", str(merged)]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(merged)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metadata"]["sdlora.merged_from"] == "a:0.8, b:1"
    # Merged in the library without names, a source is called by its header's title, else by its place.
    titled = formats.read_adapter(b)
    assert merge.merge_adapters([(formats.read_adapter(a), 0.5), (titled, 1.0)]).metadata["sdlora.merged_from"] \
        == f"adapter 0:0.5, {titled.metadata['modelspec.title']}:1"
