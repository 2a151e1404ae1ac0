"""The README stays a front door, and no link in it or in docs/ leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# [text](target) and ![alt](target); a target ends at whitespace or ")" (an optional "title" is ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code blocks hold commands, not links
    return LINK.findall(text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    titles = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)
    return {"".join(c for c in t.lower() if c.isalnum() or c in "-_ ").replace(" ", "-") for t in titles}


def test_readme_is_at_most_10_kb():
    size = README.stat().st_size
    assert size <= 10 * 1024, f"README.md is {size} bytes: keep it a front door and move detail into docs/"


def test_readme_gives_the_two_commands():
    text = README.read_text(encoding="utf-8")
    for command in ("bash scripts/setup.sh && .venv/bin/python scripts/demo.py",
                    "bash scripts/setup.sh --test && .venv/bin/python -m pytest"):
        assert f"```bash\n{command}\n```" in text, f"README.md lost the command {command!r}"


def test_ci_runs_the_readme_test_command():
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest" in (ROOT / ".ci" / "run").read_text()


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in _links(README)}
    unlinked = [page.name for page in PAGES if page.resolve() not in linked]
    assert not unlinked, f"docs pages missing from the README's 'Where to read more': {unlinked}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not checked offline
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in _anchors(destination):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{page.relative_to(ROOT)} links to: {broken}"


def _readme_command(start: str) -> str:
    """The README's one-line command that begins with `start` (as a user copies it)."""
    lines = [line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"README.md should give `{start} ...` once, found {lines}"
    return lines[0]


def test_readme_activates_the_environment_before_bare_sdlora_commands():
    text = README.read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in text
    first_bare = min(text.index(line) for line in text.splitlines() if line.startswith("sdlora "))
    assert text.index("source .venv/bin/activate") < first_bare


def test_readme_cpu_quick_start_trains_on_the_users_own_folder(tmp_path, monkeypatch):
    import shlex

    from PIL import Image

    from sdlora.config import load_config

    command = shlex.split(_readme_command("sdlora train configs/cpu-own-images.yaml "))
    config = load_config(ROOT / command[2], command[3:])
    assert config.model.base == "sdlora:shapes" and config.data.resolution == 64  # the base's own size
    assert "data.path=/path/to/my/images" in command
    assert _readme_command("sdlora train configs/sd15-gpu.yaml ").split()[3:] == command[3:]  # same shape

    # The user's own images: different sizes, one with alpha, one caption missing (the default caption is used).
    images = tmp_path / "my images"
    images.mkdir()
    for index, (size, mode) in enumerate([((96, 80), "RGB"), ((64, 64), "RGBA"), ((200, 120), "RGB")]):
        Image.new(mode, size, (40 * index, 90, 200, 128)[: len(mode)]).save(images / f"{index}.png")
        if index:
            (images / f"{index}.txt").write_text("a blue square on a white background, my style")
    argv = [a.replace("/path/to/my/images", str(images)).replace("runs/my-style", str(tmp_path / "run"))
            for a in command[1:]]
    # The command in this process, from the checkout as the README runs it (tests/test_first_hour.py runs the same
    # line in a process of its own): a process would spend most of this test importing torch.
    from sdlora.cli import main

    monkeypatch.chdir(ROOT)
    assert main([*argv, "train.steps=2", "train.lr_warmup_steps=0", "train.batch_size=2"]) == 0
    assert (tmp_path / "run" / "my_style.safetensors").is_file()
