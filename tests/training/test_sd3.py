"""SD3 trains by rectified flow on `sdlora:tiny-sd3`: through the CLI, to a lower loss, resumably, from caches
without text-encoder forwards, and without T5."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from sdlora.cli import main
from sdlora.config import ConfigError, load_config
from sdlora.data import collate
from sdlora.formats import read_adapter
from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun

BASE = "model.base=sdlora:tiny-sd3"


@pytest.fixture
def sd3_config(tiny_sd3_base, style_dataset, tmp_path):
    def make(*overrides: str):
        return load_config(None, [BASE, f"data.path={style_dataset}", "data.resolution=64", "train.steps=4",
                                  "train.batch_size=2", "train.learning_rate=1e-2", f"output.dir={tmp_path / 'run'}",
                                  *overrides])

    return make


def _eval_loss(run: TrainingRun, batch, seeds=(11, 12, 13, 14)) -> float:
    """Mean loss over fixed noise and timesteps (fresh seeded generators), so two evaluations compare."""
    parts, saved = run.parts, run.parts.generator.get_state()
    losses = []
    with torch.no_grad():
        for seed in seeds:
            parts.generator.manual_seed(seed)
            losses.append(train_loop.micro_step_loss(parts, batch).item())
    parts.generator.set_state(saved)
    return sum(losses) / len(losses)


def test_cli_trains_tiny_sd3_and_a_resumed_run_equals_the_uninterrupted_one(tiny_sd3_base, style_dataset, tmp_path):
    out = tmp_path / "cli"
    config = tmp_path / "sd3.yaml"
    config.write_text(f"model: {{base: 'sdlora:tiny-sd3'}}\ndata: {{path: {style_dataset}, resolution: 64}}\n"
                      "train: {steps: 6, batch_size: 2, learning_rate: 0.01, checkpoint_every: 3, lr_scheduler: cosine,"
                      " lr_warmup_steps: 2}\nlora: {dropout: 0.1}\n"
                      f"output: {{dir: {out}, name: sd3}}\nsample: {{prompts: [a red circle], steps: 2}}\n")
    # The command in this process: a process of its own would spend most of this test importing torch.
    assert main(["train", str(config)]) == 0
    assert (out / "samples" / "step-000006.png").is_file()  # samples render through the SD3 pipeline
    straight = read_adapter(out / "sd3.safetensors")
    assert straight.components == ["transformer"]
    assert straight.metadata["sdlora.family"] == "sd3" and straight.metadata["modelspec.prediction_type"] == "flow"
    logged = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 6
    card = ModelCard.load(out / "README.md")  # the Hub's names for SD3.5's license, and diffusers' SD3 pipeline
    assert (card.data.license, card.data.license_name) == ("other", "stabilityai-ai-community")
    assert "sd3" in card.data.tags and "StableDiffusion3Pipeline" in card.text

    # Resume a second run from the CLI run's step-3 checkpoint: it must reach the same adapter and losses.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-000003", resumed_dir / "checkpoints" / "step-000003")
    run = TrainingRun(load_config(config, [f"output.dir={resumed_dir}"]))
    run.build()
    result = run.fit(resume="latest")
    assert result.final_step == 6
    assert result.losses == pytest.approx(logged[3:], abs=1e-6)
    resumed = read_adapter(result.adapter_path).tensors["transformer"]
    assert resumed.keys() == straight.tensors["transformer"].keys()
    for key, tensor in straight.tensors["transformer"].items():
        assert torch.allclose(tensor, resumed[key], atol=1e-6), key


def test_flow_training_lowers_the_loss_and_touches_only_lora(sd3_config):
    run = TrainingRun(sd3_config("train.steps=30", "train.batch_size=4", "lora.rank=8",
                                 "lora.transformer_targets=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,"
                                 "to_add_out,ff.net.0.proj,ff.net.2,proj_out]"))
    run.build()
    frozen = {n: p.detach().clone() for n, p in run.base.unet.named_parameters() if "lora_" not in n}
    batch = collate([run.dataset[(0, i)] for i in range(4)])
    before = _eval_loss(run, batch)
    run.fit()
    after = _eval_loss(run, batch)
    print(f"SD3 flow loss on fixed draws: {before:.4f} before, {after:.4f} after 30 steps")
    # Much of a velocity target is the noise itself, which no model predicts; ~10% is what this base can lose.
    assert after < 0.95 * before, (before, after)
    for name, param in run.base.unet.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), name


def test_a_cached_run_does_no_text_encoder_forwards(sd3_config):
    from sdlora.models import load_base_model

    base = load_base_model("sdlora:tiny-sd3")
    calls = {name: 0 for name in base.text_encoders}
    for name, encoder in base.text_encoders.items():
        encoder.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    run = TrainingRun(sd3_config("data.cache_text_embeddings=true", "data.cache_latents=true", "train.steps=3"),
                      base=base)
    run.build()
    assert set(calls) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert all(count > 0 for count in calls.values()), calls  # the cache was filled by all three
    filled = dict(calls)
    result = run.fit()
    assert calls == filled, "a text encoder ran during training steps"
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def _pipeline_embeddings(base, captions, t5_length):
    pipe = base.pipeline()
    embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False,
                                              max_sequence_length=t5_length)
    return embeds, pooled


@pytest.mark.parametrize("t5", [True, False])
def test_conditioning_equals_the_pipelines_prompt_encoding(tiny_sd3_base, t5):
    from sdlora.models import load_base_model, sd3

    base = load_base_model("sdlora:tiny-sd3", use_t5=t5)
    assert (base.text_encoder_3 is not None) == t5
    captions = ["a red circle on a blue background", "sks star"]
    ours = sd3.conditioning(base, base.text_encoders.values(), torch.device("cpu"), False, 20).encode_text(captions)
    embeds, pooled = _pipeline_embeddings(base, captions, 20)
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(ours["pooled_prompt_embeds"], pooled)


def test_t5_less_training_runs_and_saves(sd3_config):
    run = TrainingRun(sd3_config("model.t5=false", "lora.train_text_encoder=true", "train.steps=2"))
    run.build()
    assert run.base.text_encoder_3 is None and "text_encoder_3" not in run.trained_models
    result = run.fit()
    assert set(read_adapter(result.adapter_path).components) == {"transformer", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("override, field", [
    ("train.noise_offset=0.05", "train.noise_offset"),
    ("train.snr_gamma=5", "train.snr_gamma"),
    ("train.prediction_type=epsilon", "train.prediction_type"),
    ("output.kohya=true", "output.kohya"),
    ("lora.unet_targets=[to_q]", "lora.unet_targets"),
    ("train.loss_type=huber", "train.loss_type"),
    ("train.max_timestep=500", "train.max_timestep"),
    ("data.masked_loss=true", "data.masked_loss"),
    ("validation.fraction=0.25", "validation"),
])
def test_levers_without_meaning_for_flow_matching_are_refused_by_name(sd3_config, override, field):
    run = TrainingRun(sd3_config(override))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run.build()


@pytest.mark.parametrize("override", ["model.t5=false", "flow.shift=2", "lora.transformer_targets=[to_q]"])
def test_sd3_only_options_on_a_unet_base_are_refused_by_name(make_config, override):
    run = TrainingRun(make_config(override))
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ": only SD3 bases"):
        run.build()
