"""A newcomer's first hour, scripted: their own folder of images through every command, as the README says.

dataset check -> train on the shipped base with the README's CPU command -> generate stacked with the demo's
subject adapter without `--base` -> grid -> merge -> convert -> info -> card -> push --dry-run. Every step must
exit 0, and every command sdlora prints for the user to run must run as printed (the user's shell has not
activated the environment, so bare `sdlora` would not be found). Steps are shortened (2 training steps, 2
denoising steps); the commands are the README's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHORT = ["train.steps=2", "train.lr_warmup_steps=0", "train.batch_size=2"]
PROMPT = "a red circle on a blue background, my style"


def _readme_line(start: str) -> list[str]:
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"README.md should give `{start} ...` once, found {lines}"
    return shlex.split(lines[0])


def _own_images(folder: Path) -> Path:
    """What a user brings: mixed sizes and formats, one with alpha, one greyscale, one without a caption."""
    folder.mkdir()
    specs = [((96, 80), "RGB", "png"), ((64, 64), "RGBA", "png"), ((200, 120), "RGB", "jpg"), ((72, 90), "L", "png"),
             ((128, 128), "RGBA", "png"), ((80, 80), "RGB", "jpg")]
    for index, (size, mode, suffix) in enumerate(specs):
        colour = (200, 40 + 30 * index, 60, 160)[: len(mode)] if mode != "L" else 120
        Image.new(mode, size, colour).save(folder / f"photo {index}.{suffix}")
        if index != 3:
            (folder / f"photo {index}.txt").write_text(PROMPT)
    return folder


class Shell:
    """Runs the CLI as the user would, each command on its own, and keeps every command sdlora printed for the user
    to run. Steps run in this process (`cli.main`, output captured at the file descriptors, so the log lines are
    seen too): a process per step would spend most of this test importing torch. The printed commands then run in
    a real shell whose PATH does not hold `sdlora` (the README's set-up makes .venv without activating it)."""

    def __init__(self, capfd):
        self.capfd = capfd
        self.env = dict(os.environ, PATH=os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                                         if not (Path(p) / "sdlora").exists()))
        self.printed: list[str] = []

    def run(self, *args: str, own_process: bool = False) -> subprocess.CompletedProcess:
        """`own_process`: a step whose log lines matter (pytest keeps log records of in-process steps to itself)."""
        from sdlora.cli import main

        if own_process:
            done = subprocess.run([sys.executable, "-m", "sdlora", *args], cwd=ROOT, env=self.env,
                                  capture_output=True, text=True, timeout=900)
        else:
            self.capfd.readouterr()
            cwd = os.getcwd()
            os.chdir(ROOT)  # the README's commands run from the checkout (configs/, datasets/)
            try:
                code = main(list(args))
            finally:
                os.chdir(cwd)
            captured = self.capfd.readouterr()
            done = subprocess.CompletedProcess(args, code, captured.out, captured.err)
        assert done.returncode == 0, f"sdlora {shlex.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
        # A card printed by `push --dry-run` holds snippets for after the upload (they name the Hub repo), not
        # commands for this machine: they are the card's business, tested with the card.
        output = done.stdout.partition("\n--- README.md ---\n")[0] + "\n" + done.stderr
        self.printed += [m.group(1) for m in re.finditer(r"`([^`\n]*\bsdlora\b [a-z][^`\n]*)`", output)]
        self.printed += [line.strip() for line in output.splitlines()
                         if re.match(r"\s*(\S*/)?(sdlora|python3?(\.\d+)?) (-m sdlora )?[a-z]+ ", line)]
        return done


def test_first_hour_from_own_images_to_a_shared_adapter(tmp_path, capfd):
    shell = Shell(capfd)
    images = _own_images(tmp_path / "my images")
    run_dir, subject_dir = tmp_path / "my-style", tmp_path / "subject"

    train = _readme_line("sdlora train configs/cpu-own-images.yaml ")
    config = train[2]
    shell.run("dataset", "check", config, f"data.path={images}")

    argv = [a.replace("/path/to/my/images", str(images)).replace("runs/my-style", str(run_dir)) for a in train[1:]]
    trained = shell.run(*argv, *SHORT, own_process=True)
    style = run_dir / "my_style.safetensors"
    assert f"adapter: {style}" in trained.stdout
    assert "caption_missing" in trained.stderr  # the image without a caption is reported, with a command to list it

    # The demo's subject adapter, trained the way scripts/demo.py trains it (shortened).
    shell.run("train", "configs/demo-subject.yaml", f"output.dir={subject_dir}", *SHORT)
    subject = subject_dir / "demo_subject.safetensors"

    # No --base: both adapters record that they were trained on sdlora:shapes, and generation uses it.
    generated = shell.run("generate", "--lora", f"{style}:0.8", "--lora", f"{subject}:1.0", "--prompt", PROMPT,
                          "--steps", "2", "-o", str(tmp_path / "stacked.png"))
    assert "sdlora:shapes" in generated.stdout + generated.stderr
    assert Image.open(tmp_path / "stacked.png").size == (64, 64)

    shell.run("grid", "--lora", str(style), "--lora", str(subject), "--x", "weight:0", "--x-values", "0,1",
              "--prompt", PROMPT, "--steps", "2", "-o", str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").is_file()

    merged = tmp_path / "merged.safetensors"
    shell.run("merge", f"{style}:0.6", f"{subject}:0.4", "-o", str(merged))
    kohya = tmp_path / "merged_kohya.safetensors"
    shell.run("convert", str(merged), str(kohya), "--to", "kohya")
    info = shell.run("info", str(kohya))
    assert "kohya" in info.stdout

    shell.run("card", str(run_dir))
    assert (run_dir / "README.md").is_file()
    plan = shell.run("push", str(run_dir), "alice/my-style", "--dry-run")
    assert "my_style.safetensors" in plan.stdout

    # Every command sdlora printed for the user runs as printed, in a shell without sdlora on its PATH.
    assert shell.printed, "the run printed no command to try (the caption warning should name one)"
    for command in dict.fromkeys(shell.printed):
        done = subprocess.run(command, shell=True, cwd=ROOT, env=shell.env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"printed command failed as printed: {command}\n{done.stderr[-2000:]}"


def test_the_readme_gpu_quick_start_is_a_valid_run_and_generate_command(tmp_path):
    """It needs SD1.5 weights, so it cannot run here: its config loads with its overrides and its generate
    arguments parse, so the README cannot drift from what sdlora accepts."""
    from sdlora.cli import build_parser
    from sdlora.config import load_config

    train = _readme_line("sdlora train configs/sd15-gpu.yaml ")
    config = load_config(ROOT / train[2], [a.replace("/path/to/my/images", str(tmp_path)) for a in train[3:]])
    assert config.model.base == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    text = README.read_text(encoding="utf-8")
    generate = re.search(r"^sdlora generate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\\n(.*)$", text, re.M)
    assert generate, "README.md's GPU quick start should generate with the SD1.5 base"
    args = build_parser().parse_args(shlex.split(generate.group(0).replace("\\\n", " "))[1:])
    adapter = Path(args.lora[0].rsplit(":", 1)[0])
    assert adapter.parent == Path(config.output.dir) and adapter.name == f"{config.output.name}.safetensors"
