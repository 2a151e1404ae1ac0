"""Hub repo ids are checked in one place (`sdlora.config.names`), with one wording, wherever one is given:
the config (`hub.repo_id`, `output.base_model_id`), `push` and the checkpoint pusher, `card --repo-id`, and
`--lora USER/REPO[:FILE]` sources."""

from __future__ import annotations

import pytest

from sdlora import hub
from sdlora.cli import main
from sdlora.config import ConfigError, load_config, validate_config
from sdlora.config.names import RepoIdError, check_repo_id, is_repo_id
from sdlora.hub.card import AdapterInfo, CardError, RunFacts, card_for

WORDING = "expected USER/NAME (or ORG/NAME), e.g. alice/my-style-lora"
GOOD = ["alice/style-lora", "Alice/my_style.lora", "org-1/v1.5", "a/b", "stabilityai/stable-diffusion-xl-base-1.0"]
BAD = ["not a repo", "alice", "alice/", "/alice/style", "alice/style/extra", "-alice/style", ".alice/style",
       "alice/sty le", "alice\\style", "", "/home/alice/models/sd15"]


@pytest.mark.parametrize("repo_id", GOOD)
def test_good_repo_ids_pass_everywhere(repo_id, tmp_path):
    assert is_repo_id(repo_id) and check_repo_id(repo_id) == repo_id
    config = load_config(None, [f"hub.repo_id={repo_id}", f"output.base_model_id={repo_id}"])
    assert (config.hub.repo_id, config.output.base_model_id) == (repo_id, repo_id)
    assert hub.parse_hub_source(repo_id) == (repo_id, None)
    assert hub.parse_hub_source(f"{repo_id}:style.safetensors") == (repo_id, "style.safetensors")


@pytest.mark.parametrize("repo_id", BAD)
def test_bad_repo_ids_get_one_wording_everywhere(repo_id, tmp_path, capsys):
    assert not is_repo_id(repo_id)
    with pytest.raises(RepoIdError) as error:
        check_repo_id(repo_id)
    message = str(error.value)
    assert message == f"repo id {repo_id!r}: {WORDING}"

    for section, field in (("hub", "repo_id"), ("output", "base_model_id")):
        with pytest.raises(ConfigError) as error:
            validate_config({section: {field: repo_id}})
        assert f"{section}.{field}" in str(error.value) and message in str(error.value)
    with pytest.raises(hub.HubError) as error:
        hub.plan_upload(tmp_path, repo_id)  # checked before the run folder is read
    assert str(error.value) == message
    with pytest.raises(hub.HubError) as error:
        hub.CheckpointPusher(tmp_path, repo_id)
    assert str(error.value) == message
    with pytest.raises(CardError) as error:
        card_for(_facts(), repo_id)
    assert str(error.value) == f"--repo-id: {message}"
    assert main(["card", str(tmp_path), f"--repo-id={repo_id}"]) == 2  # before it looks for a run in the folder
    assert capsys.readouterr().err.strip() == f"sdlora: error: --repo-id: {message}"
    assert hub.parse_hub_source(repo_id) is None


def test_hub_source_forms():
    assert hub.parse_hub_source("alice/style-lora:") is None  # a colon with no file name
    assert hub.parse_hub_source("folder/style.safetensors") is None  # a local path that does not exist
    assert hub.parse_hub_source("alice/style-lora:style_kohya.safetensors") == ("alice/style-lora",
                                                                               "style_kohya.safetensors")


def test_push_checkpoints_still_needs_a_repo():
    with pytest.raises(ConfigError, match="hub.push_checkpoints needs hub.repo_id"):
        load_config(None, ["hub.push_checkpoints=true"])


def _facts() -> RunFacts:
    return RunFacts(config=load_config(None, []), adapters=[AdapterInfo("a.safetensors", "diffusers", {})],
                    samples=[], dataset_size=None, final_loss=None, steps_done=None)
