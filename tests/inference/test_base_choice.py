"""generate and grid without --base run on the base the adapters record (issue 18, item 1)."""

from __future__ import annotations

import pytest
from adapter_factory import make_adapter
from PIL import Image

from sdlora import cli, formats
from sdlora.inference import AdapterSpec, BaseChoiceError, choose_base
from sdlora.models import load_base_model


def _adapter(path, unet, base: str | None, seed: int = 0):
    adapter = make_adapter(unet, rank=2, seed=seed)
    if base is not None:
        adapter.metadata["sdlora.base_model"] = base
    return formats.save_diffusers(path, adapter)


@pytest.fixture(scope="module")
def shapes_pair(tmp_path_factory):
    """Two adapters trained (here: made) on the shipped base, as `runs/my-dots` and the demo's subject adapter."""
    unet = load_base_model("sdlora:shapes").unet
    folder = tmp_path_factory.mktemp("shapes-adapters")
    return (_adapter(folder / "my_dots.safetensors", unet, "sdlora:shapes", seed=1),
            _adapter(folder / "demo_subject.safetensors", unet, "sdlora:shapes", seed=2))


def test_stacked_generate_without_base_uses_the_recorded_base(shapes_pair, tmp_path, capsys):
    """The issue's command: before, the default sdlora:tiny met adapters made for sdlora:shapes (size mismatch)."""
    dots, subject = shapes_pair
    out = tmp_path / "gen.png"
    code = cli.main(["generate", "--lora", f"{dots}:0.8", "--lora", f"{subject}:1.0", "--prompt", "a red circle",
                     "--steps", "1", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # On stderr, with the progress: stdout holds only the `image: ...` line scripts read.
    assert "base: sdlora:shapes (recorded by my_dots.safetensors, demo_subject.safetensors)" in captured.err
    assert Image.open(out).size == (64, 64)  # the shipped base's own resolution


def test_grid_without_base_uses_the_recorded_base(shapes_pair, tmp_path, capsys):
    dots, _ = shapes_pair
    code = cli.main(["grid", "--lora", str(dots), "--prompt", "a red circle", "--steps", "1", "--x-values", "0,1",
                     "-o", str(tmp_path / "grid.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "base: sdlora:shapes (recorded by my_dots.safetensors)" in captured.err


def test_explicit_base_wins_and_says_so(tiny_base, tmp_path, capsys):
    fits_tiny = _adapter(tmp_path / "a.safetensors", load_base_model(str(tiny_base)).unet, "sdlora:shapes")
    code = cli.main(["generate", "--base", str(tiny_base), "--lora", str(fits_tiny), "--prompt", "x", "--steps", "1",
                     "--height", "64", "--width", "64", "-o", str(tmp_path / "x.png")])
    assert code == 0
    assert f"base: {tiny_base} (--base)" in capsys.readouterr().err


def test_adapters_that_disagree_are_refused_in_one_line(shapes_pair, tmp_path, capsys):
    dots, _ = shapes_pair
    other = tmp_path / "other.safetensors"
    other.write_bytes(dots.read_bytes())
    tensors, metadata = formats.read_safetensors(dots)
    from safetensors.torch import save_file

    save_file(tensors, str(other), metadata={**metadata, "sdlora.base_model": "runwayml/stable-diffusion-v1-5"})
    code = cli.main(["generate", "--lora", str(dots), "--lora", str(other), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sdlora: error: the adapters were trained on different bases")
    assert "my_dots.safetensors on sdlora:shapes" in err
    assert "other.safetensors on runwayml/stable-diffusion-v1-5" in err
    assert "--base" in err


def test_a_local_base_by_name_only_asks_for_base(tiny_base, tmp_path):
    adapter = _adapter(tmp_path / "mine.safetensors", load_base_model(str(tiny_base)).unet, "my-base-folder")
    with pytest.raises(BaseChoiceError, match=r"'my-base-folder', a local folder or file .* pass --base PATH"):
        choose_base(None, [AdapterSpec(str(adapter))])


def test_adapters_without_a_record_keep_the_default(tiny_base, tmp_path):
    adapter = _adapter(tmp_path / "old.safetensors", load_base_model(str(tiny_base)).unet, None)
    choice = choose_base(None, [AdapterSpec(str(adapter), 0.5)])
    assert choice.source == "sdlora:tiny" and "no adapter records its base" in choice.reason
    assert choose_base("user/base", [AdapterSpec(str(adapter))]).source == "user/base"
