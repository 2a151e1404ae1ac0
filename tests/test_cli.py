"""Smoke-test the real command line at 64 px for a few steps; assert the exact files written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from sdlora.cli import main
from sdlora.formats import read_adapter


def _sdlora(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_then_generate(tiny_base, style_dataset, tmp_path):
    """In this process (`cli.main`): the files are the command's, and a process of its own would spend most of this
    test importing torch. Real processes run `sdlora train` in the resume-command and third-party-warning tests."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  base: {tiny_base}\n"
        f"data:\n  path: {style_dataset}\n  resolution: 64\n"
        "train:\n  steps: 3\n  batch_size: 2\n  checkpoint_every: 2\n"
        f"output:\n  dir: {tmp_path / 'out'}\n  name: style\n"
        "sample:\n  prompts: [a red circle]\n  steps: 2\n"
    )
    assert main(["train", str(config), "train.learning_rate=2e-3"]) == 0
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == [
        "README.md",
        "checkpoints/step-000002/run.json",
        "checkpoints/step-000002/state.json",
        "checkpoints/step-000002/state.safetensors",
        "checkpoints/step-000002/trainable.safetensors",
        "checkpoints/step-000003/run.json",
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
    assert main(["generate", "--base", str(tiny_base), "--lora", f"{out / 'style.safetensors'}:0.7",
                 "--prompt", "a red circle", "--steps", "2", "--height", "64", "--width", "64", "-o", str(image)]) == 0
    assert Image.open(image).size == (64, 64)


def test_bad_config_is_one_clear_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stpes: 3\n")
    done = _sdlora("train", str(config))
    assert done.returncode == 2
    assert "unknown key 'train.stpes'" in done.stderr and "did you mean 'steps'" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_dataset_is_reported_before_loading_a_model(tmp_path, capsys):
    # In this process: the one-line errors are main's; a process would only add its imports.
    assert main(["train", str(tmp_path / "x.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  base: /no/such/model\ndata:\n  path: {tmp_path / 'missing'}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "missing does not exist" in err and "Traceback" not in err


def _without_the_environment() -> dict[str, str]:
    """The environment of a shell where the README's `.venv` was made but never activated."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    return {**os.environ, "PATH": path}


def test_the_resume_command_a_ctrl_c_prints_runs_as_printed(tiny_base, style_dataset, tmp_path):
    # The README's set-up makes .venv; its console script is run by path, `sdlora` itself is not on the PATH.
    script = Path(sys.executable).with_name("sdlora")
    assert script.is_file(), f"{script}: the console script `pip install -e .` writes is missing"
    env = _without_the_environment()
    assert subprocess.run("command -v sdlora", shell=True, env=env, capture_output=True).returncode != 0
    (tmp_path / "run.yaml").write_text(
        f"model: {{base: {tiny_base}}}\ndata: {{path: {style_dataset}, resolution: 64}}\n"
        "train: {steps: 12, batch_size: 2, checkpoint_every: 0}\n"
    )
    log = tmp_path / "my run" / "train_log.jsonl"
    proc = subprocess.Popen([str(script), "train", "run.yaml", "output.dir=my run", "train.learning_rate=2e-3"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 600
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: finish the step, checkpoint, print the resume command
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, stdout
    lines = stdout.splitlines()
    resume = next(after for line, after in zip(lines, lines[1:]) if "resume with" in line).strip()

    done = subprocess.run(resume, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{resume}\n{done.stderr}"
    assert "resumed from" in done.stderr
    assert len(log.read_text().splitlines()) == 12


def test_a_printed_command_names_the_program_that_runs(monkeypatch, tmp_path):
    from sdlora import command_line

    monkeypatch.setattr(sys, "argv", [str(Path(__file__))])  # not the console script: `python -m sdlora`
    assert command_line("train", "a b.yaml") == f"{sys.executable} -m sdlora train 'a b.yaml'"
    script = tmp_path / "venv bin" / "sdlora"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert command_line("info", "x") == f"'{script}' info x"  # not activated: the script by its path
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert command_line("info", "x") == "sdlora info x"  # activated: the name the shell finds


def test_help_shows_defaults_version_and_what_each_argument_is(capsys):
    import pytest

    import sdlora
    from sdlora.cli import build_parser, main
    from sdlora.config import SampleSection

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sdlora {sdlora.__version__}"
    parser = build_parser()
    helps = {}
    for command in ("generate", "grid", "convert", "info"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())
    assert "(default: the base the adapters record, else sdlora:tiny)" in helps["generate"]
    assert "(default: 25)" in helps["generate"]
    assert "(default: sdlora.png)" in helps["generate"] and "(default: grid.png)" in helps["grid"]
    # One default for guidance, the schema's (what a run's samples use unless a config says otherwise).
    assert f"(default: {SampleSection().guidance_scale}, as a run's sample.guidance_scale" in helps["generate"]
    assert "input adapter file" in helps["convert"] and "output file to write" in helps["convert"]
    assert "file adapter file" in helps["info"]


def test_train_without_arguments_asks_only_for_the_config(capsys):
    import pytest

    from sdlora.cli import main

    with pytest.raises(SystemExit):
        main(["train"])
    err = capsys.readouterr().err
    assert "required: config" in err and "overrides" not in err.splitlines()[-1]
    assert "[overrides ...]" in err  # the usage line shows them as optional


def test_a_grid_over_prompts_needs_no_prompt(capsys):
    from sdlora.cli import build_parser, main
    from sdlora.inference import grid

    args = build_parser().parse_args(["grid", "--x", "weight:0", "--x-values", "0,1", "--y", "prompt",
                                      "--y-values", "a red circle|a blue square", "--lora", "a.safetensors"])
    columns, rows = grid.axis_from_text(args.x, args.x_values, "--x", 1), grid.axis_from_text(args.y, args.y_values,
                                                                                              "--y", 1)
    assert args.prompt is None and grid.prompt_of_cells(args.prompt, columns, rows) == ""
    assert [cell.prompt for row in grid.plan(columns, rows, "", 0, []) for cell in row] == [
        "a red circle", "a red circle", "a blue square", "a blue square"]
    # Without a prompt axis it is still needed, and said so in one line before any model loads.
    assert main(["grid", "--x-values", "0,1", "--lora", "a.safetensors"]) == 2
    assert "--prompt: give the prompt, or put prompts on an axis" in capsys.readouterr().err


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
