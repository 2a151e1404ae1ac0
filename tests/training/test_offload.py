"""Cached runs train only the UNet step: encoders are released (to the CPU or the meta device) and borrowed back
for samples; nothing the cache made unnecessary runs or stays on the device."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from sdlora.training import loop as train_loop
from sdlora.training.run import TrainingRun

# -- only the UNet step with cached inputs ------------------------------------------------------------------------


def test_cached_batches_run_no_vae_or_text_encoder_forward(make_config):
    run = TrainingRun(make_config())
    run.build()
    calls = {"vae": 0, "text_encoder": 0}
    for name, module in (("vae", run.base.vae), ("text_encoder", run.base.text_encoder)):
        for sub in module.modules():
            sub.register_forward_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))

    class Quiet:
        def after_step(self, step, loss, lr, grad_norm=None):
            pass

        def should_stop(self):
            return False

    generator = torch.Generator().manual_seed(0)
    cached = [{"latents": torch.randn(2, 4, 8, 8, generator=generator),
               "encoder_hidden_states": torch.randn(2, 32, 32, generator=generator)} for _ in range(3)]
    losses = train_loop.fit(run.parts, iter(cached), 0, 3, Quiet())
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert calls == {"vae": 0, "text_encoder": 0}
    # The hooks do count: one step on decoded images runs both encoders.
    train_loop.fit(run.parts, iter(run.data_loader(0)), 3, 4, Quiet())
    assert calls["vae"] > 0 and calls["text_encoder"] > 0


def test_a_cached_run_frees_the_encoders_and_still_trains(make_config, tmp_path):
    """Issue 8: with latents and text cached, the VAE and the frozen text encoder leave memory after caching."""
    run = TrainingRun(make_config("data.cache_latents=true", "data.cache_text_embeddings=true", "train.steps=3",
                                  f"data.cache_dir={tmp_path / 'cache'}"))
    run.build()
    assert run.released == {"vae.encoder": "released", "vae": "meta", "text_encoder": "meta"}
    assert all(p.is_meta for p in [*run.base.vae.parameters(), *run.base.text_encoder.parameters()])
    assert next(run.base.unet.parameters()).device.type == "cpu"
    result = run.fit()
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert result.adapter_path.is_file()
    # Anything that still reached a freed part would fail loudly rather than silently cost time.
    with pytest.raises(RuntimeError, match="vae.encoder was released after caching"):
        run.base.vae.encoder(torch.zeros(1, 3, 8, 8))


def test_a_cached_run_with_samples_keeps_what_samples_need(make_config, tmp_path):
    run = TrainingRun(make_config("data.cache_latents=true", "data.cache_text_embeddings=true", "train.steps=2",
                                  "sample.prompts=[a red circle]", "sample.steps=2",
                                  f"data.cache_dir={tmp_path / 'cache'}"))
    run.build()
    # On a CPU the text encoder is already in the only memory there is; only the VAE encoder goes.
    assert run.released == {"vae.encoder": "released"}
    assert not any(p.is_meta for p in run.base.vae.decoder.parameters())
    run.fit()
    grids = sorted((run.output_dir / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).getextrema() != ((0, 0), (0, 0), (0, 0))


def test_borrowed_refuses_released_modules():
    from sdlora.training import offload

    here = torch.nn.Linear(2, 2)
    with offload.borrowed([here], torch.device("cpu")):
        assert here.weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="released after caching"):
        with offload.borrowed([torch.nn.Linear(2, 2).to("meta")], torch.device("cpu")):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_borrowed_round_trips_a_parked_text_encoder():
    from sdlora.training import offload

    parked = torch.nn.Linear(2, 2)
    with offload.borrowed([parked], torch.device("cuda")):
        assert parked.weight.is_cuda
    assert parked.weight.device.type == "cpu"


def test_released_encoders_go_to_meta_even_with_their_own_parameter_type():
    """bitsandbytes' 4-bit weights (an nf4 base's text encoder) return their own Parameter type from `.to()`, and
    `module.to("meta")` then fails; releasing a cached run's encoders must still free them."""
    from types import SimpleNamespace

    from sdlora.training import offload

    class Packed(torch.nn.Parameter):  # what bitsandbytes.nn.Params4bit does in .to()
        def to(self, *args, **kwargs):
            return Packed(super().to(*args, **kwargs), requires_grad=False)

    encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    encoder[0].weight = Packed(encoder[0].weight.data, requires_grad=False)
    probe = torch.nn.Linear(4, 4)
    probe.weight = Packed(probe.weight.data, requires_grad=False)
    with pytest.raises(RuntimeError, match="Parameter"):
        probe.to("meta")  # the failure being avoided
    base = SimpleNamespace(vae=None, text_encoders={"text_encoder": encoder})
    moved = offload.release_cached_encoders(base, torch.device("cpu"), latents_cached=False, text_cached=True,
                                            text_trained=False, samples_wanted=False)
    assert moved == {"text_encoder": "meta"}
    assert all(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    assert encoder[0].weight.shape == (4, 4) and not encoder[0].weight.requires_grad
