"""`sdlora ui` starts safely or says in one line why not: a taken port, a public address without a password, no
gradio installed."""

from __future__ import annotations

import subprocess
import sys

from sdlora import cli
from tests.ui.conftest import REPO, free_port


def _sdlora_ui(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdlora", "ui", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def test_a_second_ui_on_the_same_port_gives_one_clear_line(ui):
    second = _sdlora_ui("--root", str(ui.root), "--runs", str(ui.runs), "--port", str(ui.port))
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"sdlora: error: port {ui.port} on 127.0.0.1 is already in use (Address already in use; another sdlora ui?): "
        "stop it or choose another with --port"]
    assert ui.process.poll() is None  # the first one is untouched


def test_a_public_address_needs_a_password(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SDLORA_UI_AUTH", raising=False)
    assert cli.main(["ui", "--host", "0.0.0.0", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--auth USER:PASSWORD" in err[0] and "0.0.0.0" in err[0]
    assert cli.main(["ui", "--host", "0.0.0.0", "--auth", "nopassword", "--root", str(tmp_path)]) == 2
    assert "expected USER:PASSWORD" in capsys.readouterr().err


def test_without_gradio_it_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets when it is not installed
    assert cli.main(["ui", "--root", str(tmp_path), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == "sdlora: error: the web UI needs gradio: pip install 'sdlora[ui]'"
