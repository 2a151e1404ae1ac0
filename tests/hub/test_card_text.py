"""The card and `push --dry-run` read well: no bare placeholders, no repeated trigger word, honest loss window
(issue 18, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdlora.cli import main
from sdlora.config import load_config
from sdlora.hub.card import AdapterInfo, RunFacts, card_for, example_prompt
from sdlora.training.run import train

REPO = "alice/dots"


@pytest.fixture(scope="module")
def local_base_run(tiny_base, style_dataset, tmp_path_factory) -> Path:
    """15 steps on a base in a local folder, the trigger word inside the sample prompt (as the demo configs do)."""
    root = tmp_path_factory.mktemp("card-text")
    train(load_config(None, [
        f"model.base={tiny_base}", f"data.path={style_dataset}", "data.resolution=64", "train.steps=15",
        "train.batch_size=1", f"output.dir={root / 'run'}", "output.name=my_dots",
        "output.trigger_words=[dotted style]",
        'sample.prompts=["dotted style, a red circle on a blue background"]', "sample.steps=1",
    ]))
    return root / "run"


def test_dry_run_of_a_local_base_says_what_to_replace(local_base_run, tiny_base, capsys):
    assert main(["push", str(local_base_run), REPO, "--dry-run"]) == 0
    text = capsys.readouterr().out
    name = Path(tiny_base).name
    assert "BASE_MODEL_ID" not in text
    assert f"**Replace `PATH/TO/{name}` below** with the base this adapter was trained on" in text
    assert f'from_pretrained("PATH/TO/{name}"' in text and f"--base PATH/TO/{name} " in text


def test_example_prompt_holds_the_trigger_word_once(local_base_run, capsys):
    assert main(["push", str(local_base_run), REPO, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert 'pipe("dotted style, a red circle on a blue background")' in text
    assert text.count("dotted style, a red circle on a blue background, dotted style") == 0
    assert example_prompt(["dotted style"], "a red circle") == "dotted style, a red circle"
    assert example_prompt(["Dotted Style", "sks"], "dotted style, a square") == "sks, dotted style, a square"


def test_final_loss_says_how_many_steps_it_averaged(local_base_run, capsys):
    assert main(["card", str(local_base_run)]) == 0
    text = (local_base_run / "README.md").read_text()
    assert "| final loss (mean of the last 15 logged steps) |" in text and "last 20" not in text


def _facts(base: str) -> RunFacts:
    config = load_config(None, [f"model.base={base}", "output.name=style", "output.trigger_words=[sks]"])
    metadata = {"sdlora.base_model": base, "sdlora.family": "sd1"}
    return RunFacts(config=config, adapters=[AdapterInfo("style.safetensors", "diffusers", metadata)], samples=[],
                    dataset_size=8, final_loss=None, steps_done=2)


def test_a_built_in_base_is_named_so_that_the_snippets_run():
    text = str(card_for(_facts("sdlora:shapes"), REPO))
    assert "BASE_MODEL_ID" not in text and "--base sdlora:shapes " in text
    line = next(line for line in text.splitlines() if "from_pretrained(" in line)
    argument = line.split("from_pretrained(", 1)[1].split(", torch_dtype", 1)[0]
    assert "from sdlora.models import resolve_builtin" in text
    from sdlora.models import resolve_builtin

    folder = eval(argument, {"resolve_builtin": resolve_builtin})  # the snippet's own expression
    assert (Path(folder) / "model_index.json").is_file()


def test_the_card_points_at_the_runs_own_kohya_file_not_the_emas():
    facts = _facts("sdlora:shapes")
    metadata = facts.adapters[0].metadata
    facts.adapters[:] = [AdapterInfo(name, kind, metadata) for name, kind in (
        ("style.safetensors", "diffusers"), ("style_ema.safetensors", "diffusers"),
        ("style_ema_kohya.safetensors", "kohya"), ("style_kohya.safetensors", "kohya"))]
    assert facts.kohya.name == "style_kohya.safetensors"
    assert "Download `style_kohya.safetensors` into `ComfyUI/models/loras/`" in str(card_for(facts, REPO))


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_a_lycoris_type_card_converts_for_diffusers_instead_of_a_load_it_would_get_wrong(kind):
    """diffusers refuses LoHa/LoKr keys and drops DoRA's magnitudes: the card must not tell readers to load the file."""
    from sdlora.cli import build_parser

    config = load_config(None, ["model.base=sdlora:shapes", "output.name=style", f"lora.type={kind}"])
    metadata = {"sdlora.base_model": "sdlora:shapes", "sdlora.family": "sd1", "sdlora.adapter_type": kind,
                "sdlora.loads_in": "LyCORIS, ComfyUI, sdlora"}
    facts = RunFacts(config=config, adapters=[AdapterInfo("style.safetensors", "kohya", metadata)], samples=[],
                     dataset_size=8, final_loss=None, steps_done=2)
    text = str(card_for(facts, REPO))
    assert "pipe.load_lora_weights(" not in text and "set_adapters" not in text
    assert "does not apply" in text
    command = next(line for line in text.splitlines() if line.startswith("sdlora convert "))
    args = build_parser().parse_args(command.split()[1:])  # the card's command is one the CLI accepts
    assert (args.to, str(args.input), args.base) == ("lora", "style.safetensors", "sdlora:shapes" if kind == "dora" else None)
    assert f"| `style.safetensors` | {kind} | LyCORIS, ComfyUI, sdlora |" in text
    assert f"| adapter type | {kind} |" in text
