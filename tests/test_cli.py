"""Smoke-test the real command line at 64 px for a few steps; assert the exact files written."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from sdlora.formats import read_adapter


def _sdlora(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_then_generate(tiny_base, style_dataset, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  base: {tiny_base}\n"
        f"data:\n  path: {style_dataset}\n  resolution: 64\n"
        "train:\n  steps: 3\n  batch_size: 2\n  checkpoint_every: 2\n"
        f"output:\n  dir: {tmp_path / 'out'}\n  name: style\n"
        "sample:\n  prompts: [a red circle]\n  steps: 2\n"
    )
    done = _sdlora("train", str(config), "train.learning_rate=2e-3")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [
        "README.md",
        "checkpoints/step-000002/state.json",
        "checkpoints/step-000002/state.safetensors",
        "checkpoints/step-000002/trainable.safetensors",
        "checkpoints/step-000003/state.json",
        "checkpoints/step-000003/state.safetensors",
        "checkpoints/step-000003/trainable.safetensors",
        "config.yaml",
        "samples/step-000003.png",
        "style.safetensors",
        "train_log.jsonl",
    ]
    assert "learning_rate: 0.002" in (out / "config.yaml").read_text()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert read_adapter(out / "style.safetensors").shapes["unet"].rank == 4

    image = tmp_path / "gen.png"
    done = _sdlora("generate", "--base", str(tiny_base), "--lora", f"{out / 'style.safetensors'}:0.7",
                   "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64", "-o", str(image))
    assert done.returncode == 0, done.stderr
    assert Image.open(image).size == (64, 64)


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stpes: 3\n")
    done = _sdlora("train", str(config))
    assert done.returncode == 2
    assert "unknown key 'train.stpes'" in done.stderr and "did you mean 'steps'" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_dataset_is_reported_before_loading_a_model(tmp_path):
    done = _sdlora("train", str(tmp_path / "x.yaml"))
    assert done.returncode == 2 and "config file not found" in done.stderr
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  base: /no/such/model\ndata:\n  path: {tmp_path / 'missing'}\n")
    done = _sdlora("train", str(config))
    assert done.returncode == 2
    assert "data.path" in done.stderr and "missing does not exist" in done.stderr


def _third_party_noise(stderr: str) -> list[str]:
    """Lines of stderr that are a library's warning rather than sdlora's own report (issue 18, item 7)."""
    markers = ("Warning:", "warnings.warn", "[transformers]", "[diffusers]", "site-packages", "Make sure to know")
    return [line for line in stderr.splitlines()
            if any(marker in line for marker in markers)
            or (line.startswith("WARNING ") and not line.startswith("WARNING sdlora"))]


def test_stacked_generate_and_a_short_training_print_no_third_party_warning(tiny_base, style_dataset, tmp_path):
    """peft's "Already found a `peft_config` attribute" on every stacked adapter and transformers' two torchvision
    lines once concerned no user; a stacked generate and a training that previews a second adapter print neither."""
    from adapter_factory import make_adapter

    from sdlora.formats import save_diffusers
    from sdlora.models import load_base_model

    unet = load_base_model(str(tiny_base)).unet
    first, second = (save_diffusers(tmp_path / f"{name}.safetensors", make_adapter(unet, rank=2, seed=seed))
                     for seed, name in enumerate(("dots", "subject")))
    done = _sdlora("generate", "--base", str(tiny_base), "--lora", f"{first}:0.8", "--lora", f"{second}:1.0",
                   "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64",
                   "-o", str(tmp_path / "gen.png"))
    assert done.returncode == 0, done.stderr
    assert not _third_party_noise(done.stderr), done.stderr

    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  base: {tiny_base}\ndata:\n  path: {style_dataset}\n  resolution: 64\n"
        f"train:\n  steps: 2\n  batch_size: 2\noutput:\n  dir: {tmp_path / 'out'}\n"
        f"sample:\n  prompts: [a red circle]\n  steps: 2\n  adapters: ['{first}:0.5']\n"
    )
    done = _sdlora("train", str(config))
    assert done.returncode == 0, done.stderr
    assert not _third_party_noise(done.stderr), done.stderr
