"""Nothing private leaves the machine: what a push uploads and the saved adapters' headers hold no local path.

A real run on the tiny base writes into pytest's tmp_path, so every private path is known: the run folder, the
dataset, the base, the home directory. The test greps every byte a push uploads (as sent to the test Hub), the
checkpoints `hub.push_checkpoints` would upload, and every header value of the diffusers and kohya files for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from test_hub import fake_token, hub_server  # noqa: F401 (fixtures: the test Hub on 127.0.0.1)

from sdlora import hub
from sdlora.cli import main
from sdlora.config import load_config
from sdlora.config.names import public_name
from sdlora.hub.card import AdapterInfo, RunFacts, card_for
from sdlora.training.run import train

REPO = "alice/private-run"


@pytest.fixture(scope="module")
def private_run(tiny_base, style_dataset, tmp_path_factory) -> Path:
    """A finished run whose every path field is a local absolute path (kohya twin, samples and card included)."""
    root = tmp_path_factory.mktemp("private")
    config = load_config(None, [
        f"model.base={tiny_base}", f"model.single_file_config={tiny_base}", f"data.path={style_dataset}",
        f"data.cache_dir={root / 'cache'}", "data.resolution=64", "train.steps=2", "train.batch_size=2",
        f"output.dir={root / 'run'}", "output.name=style", "output.kohya=true", "sample.prompts=[a red circle]",
        "sample.steps=2", "train.checkpoint_every=1",
    ])
    train(config)
    return root / "run"


def _private_strings(run_dir: Path, tiny_base: Path, style_dataset: Path) -> list[str]:
    private = [str(run_dir.parent), str(style_dataset), str(tiny_base)]
    home = str(Path.home())
    if len(home) > 1:  # a home of "/" would match every path
        private.append(home)
    return private


def _headers(run_dir: Path) -> dict[str, dict[str, str]]:
    headers = {}
    for path in sorted(run_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            headers[path.name] = dict(handle.metadata() or {})
    return headers


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_no_local_path_in_anything_a_push_uploads_or_in_the_adapter_headers(
        private_run, tiny_base, style_dataset, hub_server, capsys):  # noqa: F811
    private = _private_strings(private_run, tiny_base, style_dataset)
    # The run folder's own config keeps full paths (resume needs them): the strings searched for are real ones.
    assert str(style_dataset) in (private_run / "config.yaml").read_text()

    # What `push --dry-run` shows, the plan a push commits, and what the Hub received.
    assert main(["push", str(private_run), REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    plan = hub.plan_upload(private_run, REPO)
    planned = {path: text.encode() for path, text in plan.texts.items()}
    planned.update({path: local.read_bytes() for path, local in plan.files})
    hub.push(private_run, REPO, endpoint=hub_server.url)
    uploaded = hub_server.repos[REPO].files
    assert set(uploaded) == set(planned) == set(plan.paths)
    assert {"README.md", "config.yaml", "style.safetensors", "style_kohya.safetensors"} <= set(uploaded)
    for label, blobs in (("dry run", {"stdout": printed.encode()}), ("plan", planned), ("hub", uploaded)):
        for name, data in blobs.items():
            for secret in private:
                assert secret.encode() not in data, f"{label}: {name} holds {secret}"

    # hub.push_checkpoints uploads checkpoint folders as they are: they hold no path either.
    checkpoints = [p for p in (private_run / "checkpoints").rglob("*") if p.is_file()]
    assert checkpoints
    for path in checkpoints:
        for secret in private:
            assert secret.encode() not in path.read_bytes(), f"{path.relative_to(private_run)} holds {secret}"

    headers = _headers(private_run)
    assert set(headers) == {"style.safetensors", "style_kohya.safetensors"}
    for name, header in headers.items():
        for key, value in header.items():
            for secret in private:
                assert secret not in value, f"{name}: {key} holds {secret}"
        # The base is named by its folder name, as kohya names a local base by its file name.
        assert header["sdlora.base_model"] == tiny_base.name
        config = json.loads(header["sdlora.training_config"])
        assert not [s for s in _strings(config) if os.path.isabs(s)], f"{name}: an absolute path in the config"
        assert (config["data"]["path"], config["output"]["dir"]) == (style_dataset.name, "run")
        assert (config["data"]["cache_dir"], config["model"]["single_file_config"]) == ("cache", tiny_base.name)
        assert config["data"]["resolution"] == 64 and config["train"]["steps"] == 2  # what readers use is kept
    assert headers["style_kohya.safetensors"]["ss_sd_model_name"] == tiny_base.name
    assert headers["style_kohya.safetensors"]["ss_resolution"] == "(64, 64)"


def test_uploaded_config_still_loads_and_differs_only_in_paths(private_run):
    plan = hub.plan_upload(private_run, REPO)
    import yaml

    shared, kept = yaml.safe_load(plan.config_text), yaml.safe_load((private_run / "config.yaml").read_text())
    for section, field in (("model", "base"), ("model", "single_file_config"), ("data", "path"),
                           ("data", "cache_dir"), ("output", "dir")):
        assert shared[section][field] == Path(kept[section][field]).name
        shared[section][field] = kept[section][field]
    assert shared == kept
    from sdlora.config import validate_config

    validate_config(yaml.safe_load(plan.config_text))


# ---------------------------------------------------------------------------------------------------------------
# The card


def _facts(base: str, **output) -> RunFacts:
    overrides = [f"model.base={base}", "output.name=style", "output.trigger_words=[sks]"]
    overrides += [f"output.{key}={value}" for key, value in output.items()]
    metadata = {"sdlora.base_model": base, "sdlora.family": "sd1"}
    return RunFacts(config=load_config(None, overrides),
                    adapters=[AdapterInfo("style.safetensors", "diffusers", metadata)],
                    samples=[], dataset_size=8, final_loss=None, steps_done=2)


def test_card_names_a_local_base_by_its_folder_name_only(tmp_path):
    base = str(tmp_path / "models" / "my-base")
    card = card_for(_facts(base), REPO)
    text = str(card)
    assert str(tmp_path) not in text and "/models/" not in text
    assert "| base model | `my-base` (sd1) |" in text
    assert card.data.base_model is None  # a folder name is not a hub id: the Hub would refuse it
    assert 'from_pretrained("PATH/TO/my-base"' in text and "a Stable Diffusion base" in text

    # With output.base_model_id the card links the hub id, and the settings table still shows only the name.
    card = card_for(_facts(base, base_model_id="stable-diffusion-v1-5/stable-diffusion-v1-5"), REPO)
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert str(tmp_path) not in str(card) and "| base model | `my-base` (sd1) |" in str(card)


def test_card_keeps_hub_ids_and_built_in_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of the same name
    card = card_for(_facts("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert 'from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5"' in str(card)
    card = card_for(_facts("sdlora:shapes"))
    assert card.data.base_model is None and "| base model | `sdlora:shapes` (sd1) |" in str(card)


def test_card_of_an_older_run_with_a_full_path_in_its_metadata(private_run, tmp_path):
    """Runs written before this change hold the full path in `sdlora.base_model`: the card still shows the name."""
    facts = hub.card.gather(private_run)
    facts.primary.metadata["sdlora.base_model"] = "/home/alice/models/sd15-base"
    text = str(card_for(facts, REPO))
    assert "/home/alice" not in text and "| base model | `sd15-base` (sd1) |" in text


# ---------------------------------------------------------------------------------------------------------------
# public_name, the one rule


@pytest.mark.parametrize("source, shared", [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("alice/style-lora:style.safetensors:0.8", "alice/style-lora:style.safetensors:0.8"),
    ("sdlora:shapes", "sdlora:shapes"),
    ("sdlora:tiny", "sdlora:tiny"),
    ("/home/alice/models/sd15", "sd15"),
    ("/home/alice/models/sd15/", "sd15"),
    ("/home/alice/loras/style.safetensors:0.5", "style.safetensors:0.5"),
    ("/data/v1-5-pruned.safetensors", "v1-5-pruned.safetensors"),
    ("~/models/sd15", "sd15"),
    ("C:\\Users\\alice\\models\\sd15.safetensors", "sd15.safetensors"),
    ("", ""),
])
def test_public_name(source, shared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_name(source) == shared
    assert public_name(shared) == shared  # applying it twice changes nothing


def test_a_relative_folder_that_looks_like_a_hub_id_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert public_name("models/sd15") == "models/sd15"  # not here: a hub id, as the loaders would read it
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    assert public_name("models/sd15") == "sd15"


# ---------------------------------------------------------------------------------------------------------------
# Every other writer of a shared file


def test_converting_an_older_adapter_drops_its_full_base_path(private_run, tmp_path):
    """Files an older sdlora wrote hold the base's full path: convert and merge write the name only."""
    from sdlora import formats
    from sdlora.inference.merge import merge_adapters

    adapter = formats.read_adapter(private_run / "style.safetensors")
    adapter.metadata["sdlora.base_model"] = "/home/alice/models/sd15-base"
    written = [formats.save_kohya(tmp_path / "k.safetensors", adapter),
               formats.save_diffusers(tmp_path / "d.safetensors", adapter),
               formats.save_diffusers(tmp_path / "m.safetensors", merge_adapters([(adapter, 0.5)]))]
    headers = _headers(tmp_path)
    assert sorted(headers) == sorted(p.name for p in written)
    for name, header in headers.items():
        assert header["sdlora.base_model"] == "sd15-base", name
        assert not [k for k, v in header.items() if "/home/alice" in v], name
    assert headers["k.safetensors"]["ss_sd_model_name"] == "sd15-base"


def test_a_single_file_export_names_its_base_by_folder_name(tiny_base, tmp_path):
    from sdlora.formats.singlefile import save_single_file
    from sdlora.models import load_base_model

    path = save_single_file(load_base_model(str(tiny_base)), tmp_path / "merged.safetensors")
    header = _headers(tmp_path)[path.name]
    assert header["sdlora.source"] == tiny_base.name
    assert not [k for k, v in header.items() if str(tiny_base) in v]
