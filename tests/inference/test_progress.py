"""Issue 18, item 6: long work shows progress on stderr (a bar over a grid's cells, over generate's denoising steps),
while stdout keeps only the result lines scripts parse; previews during training stay quiet. (setup.sh's progress:
tests/test_setup_script.py.)"""

from __future__ import annotations

import subprocess

from sdlora.cli import main
from sdlora.inference import build_pipeline
from sdlora.models import load_base_model


def _sdlora(capfd, *argv: str) -> subprocess.CompletedProcess:
    """The command in this process, its output captured at the file descriptors (a pipe, as a script's would be):
    what reaches stdout and stderr is the same as from a process of its own, without seconds of imports."""
    capfd.readouterr()
    code = main(list(argv))
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def test_generate_shows_its_denoising_steps_on_stderr(tiny_base, tmp_path, capfd):
    output = tmp_path / "one.png"
    run = _sdlora(capfd, "generate", "--base", str(tiny_base), "--prompt", "a red circle", "--steps", "3", "-o", str(output))
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"image: {output}\n"
    assert "denoising" in run.stderr and "3/3" in run.stderr, run.stderr


def test_grid_shows_one_bar_over_its_cells_on_stderr(tiny_base, tmp_path, capfd):
    output = tmp_path / "grid.png"
    run = _sdlora(capfd, "grid", "--base", str(tiny_base), "--prompt", "a red circle", "--steps", "2", "--x", "seed",
                  "--x-values", "0,1,2", "-o", str(output))
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"grid: {output}\n"
    assert "grid" in run.stderr and "3/3" in run.stderr, run.stderr
    assert "denoising" not in run.stderr  # one bar over the cells, not one per cell


def test_pipelines_are_quiet_unless_asked(tiny_base):
    """Training's sample previews build their pipeline without `progress`: they stay under the training bar."""
    base = load_base_model(str(tiny_base))
    assert build_pipeline(base)._progress_bar_config["disable"] is True
    assert build_pipeline(base, progress=True)._progress_bar_config["disable"] is False



def test_slow_base_loading_shows_a_bar_fast_loading_does_not(tiny_base, capsys, monkeypatch):
    load_base_model(str(tiny_base))
    assert "loading base" not in capsys.readouterr().err  # the tiny base loads in well under the bar's delay

    import time

    from diffusers import UNet2DConditionModel

    real = UNet2DConditionModel.from_pretrained.__func__

    def slow(cls, *args, **kwargs):
        time.sleep(3.5)  # a full-size UNet read from disk on a CPU
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(slow))
    load_base_model(str(tiny_base))
    assert f"loading base {tiny_base.name}" in capsys.readouterr().err
