"""Card, push and pull against the real huggingface_hub client and a Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file

from sdlora import hub
from sdlora.cli import main
from sdlora.config import dump_config, load_config
from sdlora.workflow import train

FAKE_TOKEN = "hf_sdloraFakeToken0123456789abcdefXYZ"
REPO = "alice/style-lora"
PROMPTS = ["a red circle", "a blue square"]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fake_token():
    """A token in the environment for the whole module: training and pushing run with it present."""
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    yield FAKE_TOKEN
    if saved is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = saved


@pytest.fixture(scope="module")
def trained_run(tiny_base, style_dataset, tmp_path_factory, fake_token) -> Path:
    out = tmp_path_factory.mktemp("hubrun") / "run"
    config = load_config(None, [
        f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64", "train.steps=3",
        "train.batch_size=2", "train.learning_rate=2e-3", f"output.dir={out}", "output.name=style",
        f"sample.prompts={json.dumps(PROMPTS)}", "sample.steps=2", "output.trigger_words=[sks style]",
        "output.recommended_weight=0.8", "output.base_model_id=stable-diffusion-v1-5/stable-diffusion-v1-5",
    ])
    train(config)
    return out


@pytest.fixture
def run_dir(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, so a test may change it."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def hub_server(monkeypatch, tmp_path, fake_token):
    """The test Hub, and huggingface_hub pointed at it: online, a per-test cache, a 30 s timeout per request."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import (
        default_client_factory,
        hf_request_event_hook,
    )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    huggingface_hub.set_client_factory(lambda: httpx2.Client(
        event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True, timeout=30, trust_env=False,
    ))
    with HubServer() as server:
        yield server
    huggingface_hub.set_client_factory(default_client_factory)
    assert not server.state.unhandled, server.state.unhandled


@pytest.fixture
def hub_default(hub_server, monkeypatch):
    """Also make the server huggingface_hub's default endpoint in this process (as HF_ENDPOINT does at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    return hub_server


def _cli_env(server: HubServer, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"),
               NO_PROXY="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1")
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(proxy, None)
    return env


def _sdlora(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sdlora", *args], capture_output=True, text=True, env=env,
                          timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# The card


def test_training_writes_a_card_the_hub_reads(trained_run):
    card = ModelCard.load(trained_run / "README.md")
    data = card.data
    assert data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (data.library_name, data.pipeline_tag, data.license) == ("diffusers", "text-to-image", "creativeml-openrail-m")
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion", "template:sd-lora"} <= set(data.tags)
    assert data.instance_prompt == "sks style"
    assert [w["text"] for w in data.widget] == PROMPTS
    for entry in data.widget:
        assert (trained_run / entry["output"]["url"]).is_file()
    text = card.text
    assert 'load_lora_weights("USER/REPO", weight_name="style.safetensors", adapter_name="style")' in text
    assert 'set_adapters(["style"], adapter_weights=[0.8])' in text
    assert "| dataset size | 8 images |" in text and "| rank / alpha | 4 / 4 |" in text
    assert "![samples](samples/step-000003.png)" in text


def test_card_command_rebuilds_the_same_card_and_names_a_kohya_twin(run_dir):
    written = (run_dir / "README.md").read_text()
    (run_dir / "README.md").unlink()
    assert main(["card", str(run_dir)]) == 0
    assert (run_dir / "README.md").read_text() == written

    # A kohya-format file next to the diffusers one is listed and used for the ComfyUI / A1111 snippets.
    save_file({"lora_unet_down_blocks_0_attentions_0_proj.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj.lora_up.weight": torch.zeros(8, 4)},
              str(run_dir / "style_kohya.safetensors"))
    assert main(["card", str(run_dir), "--repo-id", REPO]) == 0
    text = (run_dir / "README.md").read_text()
    assert "| `style_kohya.safetensors` | kohya |" in text and "| `style.safetensors` | diffusers |" in text
    assert "<lora:style_kohya:0.8> sks style, a red circle" in text
    node = next(line for line in text.splitlines() if line.startswith('{"class_type": "LoraLoader"'))
    assert json.loads(node)["inputs"]["lora_name"] == "style_kohya.safetensors"
    assert f'load_lora_weights("{REPO}", weight_name="style.safetensors"' in text


def test_card_of_a_folder_that_is_not_a_run_is_one_clear_line(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Push


def test_push_uploads_the_run_in_one_commit(run_dir, hub_server):
    (run_dir / "style_kohya.safetensors").write_bytes((run_dir / "style.safetensors").read_bytes())
    before = _hashes(run_dir)
    url = hub.push(run_dir, REPO, private=True, endpoint=hub_server.url)

    repo = hub_server.repos[REPO]
    assert repo.private and len(repo.commits) == 1 and url.endswith(repo.commits[0])
    assert sorted(repo.files) == [
        "README.md", "config.yaml", "samples/step-000003.png", "style.safetensors", "style_kohya.safetensors"
    ]
    for name in ("style.safetensors", "style_kohya.safetensors", "samples/step-000003.png"):
        assert repo.files[name] == (run_dir / name).read_bytes(), name
    # The config goes up as a copy with local paths cut to their final names (the run folder keeps full ones).
    config = hub.card.gather(run_dir).config
    assert repo.files["config.yaml"].decode() == dump_config(config, public=True)
    assert str(config.data.path) in (run_dir / "config.yaml").read_text()
    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "template:sd-lora" in card.data.tags and card.data.instance_prompt == "sks style"
    assert all(w["output"]["url"] in repo.files for w in card.data.widget)
    assert f'load_lora_weights("{REPO}", weight_name="style.safetensors"' in card.text
    assert hub_server.state.validated_cards == [repo.files["README.md"].decode()]
    assert _hashes(run_dir) == before  # a push writes nothing locally


def test_dry_run_prints_files_and_card_and_sends_nothing(run_dir, hub_server, hub_default, capsys):
    before = _hashes(run_dir)
    assert main(["push", str(run_dir), REPO, "--dry-run"]) == 0
    listing, _, card_text = capsys.readouterr().out.partition("--- README.md ---\n")
    files = [line.split()[0] for line in listing.splitlines()[1:]]
    assert files == ["README.md", "config.yaml", "samples/step-000003.png", "style.safetensors"]
    assert ModelCard(card_text.strip() + "\n").data.instance_prompt == "sks style"
    assert hub_server.state.requests == [] and _hashes(run_dir) == before


@pytest.mark.parametrize("failure", ["500", "drop"])
def test_failed_upload_is_clear_leaves_the_run_untouched_and_a_retry_succeeds(run_dir, hub_server, failure):
    before = _hashes(run_dir)
    hub_server.state.fail_next_commit = failure
    with pytest.raises(hub.HubError) as error:
        hub.push(run_dir, REPO, endpoint=hub_server.url)
    message = str(error.value)
    assert REPO in message and "nothing was committed" in message and "again to retry" in message
    assert ("500" in message) if failure == "500" else ("RemoteProtocolError" in message)
    assert hub_server.repos[REPO].files == {} and _hashes(run_dir) == before

    hub.push(run_dir, REPO, endpoint=hub_server.url)
    repo = hub_server.repos[REPO]
    assert len(repo.commits) == 1 and repo.files["style.safetensors"] == (run_dir / "style.safetensors").read_bytes()
    assert _hashes(run_dir) == before


def test_push_to_a_bad_repo_id_is_one_clear_line(run_dir, capsys):
    assert main(["push", str(run_dir), "not a repo"]) == 2
    assert "expected USER/NAME" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Pull


def test_pulled_adapter_generates_the_same_image_as_the_local_file(run_dir, hub_server, hub_default, tmp_path,
                                                                    tiny_base):
    hub.push(run_dir, REPO, endpoint=hub_server.url)
    # The explicit-file form lands in the normal huggingface_hub cache, byte for byte.
    path = Path(hub.resolve_adapter(f"{REPO}:style.safetensors", endpoint=hub_server.url))
    assert "models--alice--style-lora" in path.parts and path.read_bytes() == (run_dir / "style.safetensors").read_bytes()
    assert hub.resolve_adapter(str(run_dir / "style.safetensors")) == str(run_dir / "style.safetensors")

    images = {}
    sources = {"local": [str(run_dir / "style.safetensors")], "hub": [REPO], "base": []}
    for label, lora in sources.items():
        out = tmp_path / f"{label}.png"
        flags = [arg for source in lora for arg in ("--lora", f"{source}:0.7")]
        assert main(["generate", "--base", str(tiny_base), *flags, "--prompt", "a red circle", "--steps", "2",
                     "--height", "64", "--width", "64", "-o", str(out)]) == 0
        images[label] = np.asarray(Image.open(out))
    assert np.array_equal(images["local"], images["hub"])
    # The adapter changes the image, so the equality above is not two base-model images.
    assert not np.array_equal(images["base"], images["hub"])


def test_pull_of_a_missing_repo_is_a_clear_error(hub_server):
    with pytest.raises(hub.HubError, match="alice/nothing-here.*cannot"):
        hub.resolve_adapter("alice/nothing-here", endpoint=hub_server.url)


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def test_the_token_reaches_the_server_but_no_file_or_output(run_dir, trained_run, hub_server, tmp_path):
    done = _sdlora("push", str(run_dir), REPO, "--private", env=_cli_env(hub_server, tmp_path))
    assert done.returncode == 0, done.stderr
    hub.resolve_adapter(REPO, endpoint=hub_server.url)
    auth = {r.authorization for r in hub_server.state.requests}
    assert auth == {f"Bearer {FAKE_TOKEN}"}  # it was in play for every request

    token = FAKE_TOKEN.encode()
    assert token not in done.stdout.encode() + done.stderr.encode()
    scanned = 0
    for folder in (trained_run, run_dir, tmp_path):
        for path in folder.rglob("*"):
            if path.is_file():
                scanned += 1
                assert token not in path.read_bytes(), path
    for name, data in hub_server.repos[REPO].files.items():
        assert token not in data, name
    assert scanned >= 10


# ---------------------------------------------------------------------------------------------------------------
# Background checkpoint push


def test_checkpoint_push_returns_at_once_while_the_upload_waits(run_dir, hub_server, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 2}')
    gate = threading.Event()
    hub_server.state.commit_gate = gate
    pusher = hub.CheckpointPusher(run_dir, REPO, endpoint=hub_server.url)
    assert pusher.submit(checkpoint)
    shutil.rmtree(checkpoint)  # checkpoint rotation may delete it mid-upload: the staged copy is pushed
    assert hub_server.repos.get(REPO) is None or hub_server.repos[REPO].files == {}
    gate.set()
    assert pusher.close(timeout=60)
    assert pusher.pushed == ["checkpoints/step-000002"] and pusher.failed == []
    assert hub_server.repos[REPO].files == {"checkpoints/step-000002/state.json": b'{"step": 2}'}
    assert not list(run_dir.parent.glob(".sdlora-push-*"))  # staging cleaned up


def test_training_pushes_checkpoints_and_the_finished_run(make_config, hub_server, hub_default):
    config = make_config("train.checkpoint_every=2", f"hub.repo_id={REPO}", "hub.push_checkpoints=true")
    result = train(config)
    assert not list(Path(config.output.dir).parent.glob(".sdlora-push-*"))
    files = set(hub_server.repos[REPO].files)
    assert {"checkpoints/step-000002/trainable.safetensors", "checkpoints/step-000004/trainable.safetensors",
            "README.md", "config.yaml", "pytorch_lora_weights.safetensors"} <= files
    assert hub_server.repos[REPO].files["pytorch_lora_weights.safetensors"] == result.adapter_path.read_bytes()


def test_push_checkpoints_needs_a_repo(make_config):
    from sdlora.config import ConfigError

    with pytest.raises(ConfigError, match="hub.push_checkpoints needs hub.repo_id"):
        make_config("hub.push_checkpoints=true")
