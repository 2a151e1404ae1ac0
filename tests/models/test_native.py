"""Issue 18, item 5: `sdlora dataset check` counts caption tokens with the base's own tokenizer and checks a bare
folder at the base's own resolution, built-in bases and cached hub ids included, without any download."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from sdlora import cli
from sdlora.config import load_config
from sdlora.data.preflight import CLIP_TOKEN_LIMIT, approximate_token_count
from sdlora.models import PACKAGED_BASES, caption_token_counter, native_resolution

# 26 tokens for the shipped base's tokenizer (its limit is 24), 24 by the old estimate (under CLIP's 77).
LONG = "a red circle, a blue square, a white ring and a yellow triangle on a green background, striped style"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Eleven 64 px images, as the shipped base was trained on; one caption too long for its tokenizer."""
    path = tmp_path_factory.mktemp("own") / "dots"
    path.mkdir()
    for index in range(11):
        Image.new("RGB", (64, 64), (20 * index, 40, 200)).save(path / f"{index:02d}.png")
        (path / f"{index:02d}.txt").write_text(LONG if index == 0 else "a red circle, dotted style")
    return path


def _check(capsys, *argv):
    assert cli.main(["dataset", "check", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_shipped_base_counts_with_its_own_tokenizer_and_resolution(capsys, folder):
    assert approximate_token_count(LONG) <= CLIP_TOKEN_LIMIT  # the old counter let this caption through
    report = json.loads(_check(capsys, folder, "model.base=sdlora:shapes", "--json"))
    assert (report["token_counter"], report["token_limit"]) == ("tokenizer", 24)
    long = [w for w in report["warnings"] if w["kind"] == "caption_long"]
    assert [w["path"].split("/")[-1] for w in long] == ["00.png"]
    assert "26 tokens, over the text encoder's limit of 24: 'striped style' is cut off" in long[0]["detail"]
    # Checked at the 64 px the base was trained at, not 512: no "will be upscaled" for any of the eleven.
    assert report["resolution"] == 64 and not [w for w in report["warnings"] if w["kind"] == "small"]
    assert "training.json" in report["resolution_note"]
    table = _check(capsys, folder, "model.base=sdlora:shapes")
    assert "resolution 64 (data.resolution not set: sdlora:shapes was trained at 64 px" in table
    assert "caption tokens counted with the base's own tokenizer, limit 24" in table


def test_the_warning_is_the_truncation_training_does(folder):
    """Training tokenizes with the same tokenizer, truncated to its model_max_length: "striped style" never arrives."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(PACKAGED_BASES["sdlora:shapes"] / "tokenizer"))
    ids = tokenizer(LONG, truncation=True, max_length=tokenizer.model_max_length).input_ids
    assert "striped" not in tokenizer.decode(ids) and "style" not in tokenizer.decode(ids)
    counter = caption_token_counter(load_config(None, ["model.base=sdlora:shapes"]).model)
    assert counter.count(LONG) == len(tokenizer(LONG).input_ids) == 26


def test_a_resolution_the_user_set_is_kept(capsys, folder):
    report = json.loads(_check(capsys, folder, "model.base=sdlora:shapes", "data.resolution=128", "--json"))
    assert report["resolution"] == 128 and len([w for w in report["warnings"] if w["kind"] == "small"]) == 11


def test_a_config_file_is_checked_as_it_trains_with_a_hint(capsys, folder, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  base: sdlora:shapes\ndata:\n  path: {folder}\n")
    table = _check(capsys, config)
    assert "resolution 512 (the default; sdlora:shapes was trained at 64 px" in table
    assert "set data.resolution=64" in table


def test_diffusers_folder_reads_its_configs(tiny_base):
    model = load_config(None, [f"model.base={tiny_base}"]).model
    found = native_resolution(model)
    assert found.side == 64 and "sample_size 8 x VAE downsampling 8" in found.why
    assert caption_token_counter(model).limit == 32  # the tiny tokenizer's model_max_length


def test_builtin_tiny_base_is_resolved():
    model = load_config(None, ["model.base=sdlora:tiny"]).model
    assert native_resolution(model).side == 64 and caption_token_counter(model).limit == 32


def test_hub_id_read_from_the_cache_only(tiny_base, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--someone--dots-base"
    shutil.copytree(tiny_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    cached = load_config(None, ["model.base=someone/dots-base"]).model
    assert native_resolution(cached).side == 64 and caption_token_counter(cached).limit == 32
    # Not in the cache: nothing is downloaded; the check estimates, at the configured resolution.
    absent = load_config(None, ["model.base=someone/never-downloaded"]).model
    assert native_resolution(absent) is None and caption_token_counter(absent) is None
