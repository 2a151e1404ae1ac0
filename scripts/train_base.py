"""Train `sdlora:shapes`, the small pretrained base that ships with sdlora, from scratch on CPU.

A text-to-image latent diffusion model in SD1.5's own classes (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel + the project-made CLIP tokenizer, DDPM scaled-linear schedule, epsilon target), trained on the
procedurally generated shapes world (`sdlora.bench.shapes`): "a red circle on a blue background".

Stage 1 trains the VAE on every style of the world (plain, striped, outlined, rings), so its latent space can
express textures and objects the UNet has never been taught: that is what LoRAs add later. Stage 2 trains the
UNet and text encoder on plain circles, squares and triangles only, with 10 % empty captions for
classifier-free guidance, offset noise (so the background colour comes from the prompt, not from the starting
noise) and an EMA of the UNet weights. Everything is seeded; re-running with the same
arguments reproduces the model.

Training takes over an hour of CPU, so it can stop and go on: every --save-every UNet steps it writes a usable
snapshot (OUT-stepN) and the whole training state (OUT-state/state.safetensors: VAE, UNet, EMA, text encoder,
AdamW moments, random generator). Run the same command with --resume and it continues from that state; the
result is the one an uninterrupted run gives, bit for bit (tests/test_train_base.py).

    python scripts/train_base.py --out sdlora/assets/shapes --save-every 250   # the shipped model
    python scripts/train_base.py --out sdlora/assets/shapes --save-every 250 --resume   # go on after a stop
    python scripts/train_base.py --out /tmp/shapes --unet-steps 300    # a quick smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.bench.shapes import SHAPES, STYLES, SUBJECT_SHAPE, random_scene, render
from sdlora.files.atomic import save_safetensors_atomic
from sdlora.models import families
from sdlora.models.base import pipeline_from_components
from sdlora.models.tiny import make_tokenizer

WORDS = "a on background style sks ring circle square triangle striped outline plain red green blue yellow white black"


def to_tensor(images) -> torch.Tensor:
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def world_batch(rng: random.Random, count: int, size: int, styled: bool):
    scenes = []
    for _ in range(count):
        if styled:  # every look the world has, for the VAE
            scenes.append(random_scene(rng, style=rng.choice(STYLES), shape=rng.choice(SHAPES + (SUBJECT_SHAPE,))))
        else:
            scenes.append(random_scene(rng))
    return scenes, to_tensor([render(s, size) for s in scenes])


def build_models(args, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, sample_size=args.size,
    )
    unet = UNet2DConditionModel(
        sample_size=args.size // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=tuple(args.unet_channels), cross_attention_dim=args.text_hidden, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_hidden, intermediate_size=args.text_hidden * 4,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=args.text_hidden, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = families.noise_scheduler()
    return vae, unet, text_encoder, scheduler


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, args, log) -> float:
    """L1 + MSE reconstruction with a small KL term; returns the latent scaling factor (1 / latent std)."""
    rng = random.Random(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    started = time.perf_counter()
    crop = args.vae_crop
    for step in range(args.vae_steps):
        _, images = world_batch(rng, args.batch, args.size, styled=True)
        # The VAE is fully convolutional: random crops train it at a quarter of the cost of full images.
        top, left = rng.randrange(0, args.size - crop + 1, 4), rng.randrange(0, args.size - crop + 1, 4)
        images = images[:, :, top : top + crop, left : left + crop]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    vae.eval()
    with torch.no_grad():
        _, images = world_batch(random.Random(args.seed + 1), 256, args.size, styled=False)
        latents = vae.encode(images).latent_dist.mean
    return float(1.0 / latents.std())


def encode_pool(vae, tokenizer, args, scaling: float):
    """A fixed pool of plain scenes: latent mean/std and token ids, computed once."""
    rng = random.Random(args.seed + 2)
    means, stds, ids = [], [], []
    with torch.no_grad():
        for _ in range(args.pool // 256):
            scenes, images = world_batch(rng, 256, args.size, styled=False)
            dist = vae.encode(images).latent_dist
            means.append(dist.mean * scaling)
            stds.append(dist.std * scaling)
            ids.append(tokenizer([s.caption for s in scenes], padding="max_length", truncation=True,
                                 max_length=tokenizer.model_max_length, return_tensors="pt").input_ids)
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def train_unet(unet, text_encoder, scheduler, pool, tokenizer, args, log, snapshot=None, resume_from=None):
    means, stds, ids = pool
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    ema = copy.deepcopy(unet).requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed + 3)
    first = 0
    if resume_from is not None:
        first = restore_unet_state(resume_from, unet, ema, text_encoder, optimizer, generator)
        log(f"resumed at unet step {first}")
    alphas = scheduler.alphas_cumprod
    started = time.perf_counter()
    for step in range(first, args.unet_steps):
        index = torch.randint(0, len(means), (args.batch,), generator=generator)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        if torch.rand((), generator=generator) < 0.5:  # horizontal flip: positions vary, captions don't change
            latents = latents.flip(-1)
        tokens = ids[index].clone()
        drop = torch.rand(args.batch, generator=generator) < 0.1
        tokens[drop] = empty
        noise = torch.randn(latents.shape, generator=generator)
        # Offset noise: with 16x16 latents of large, flat backgrounds, the mean of x_t at the last timesteps still
        # shows the image's background colour, so a model trained on plain noise learns to read the colour from the
        # noise instead of the prompt (measured: from pure noise every prompt got the colour the noise's mean was
        # nearest to). A random per-channel offset hides that mean; sampling still starts from plain noise.
        noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(tokens, return_dict=False)[0]
        prediction = unet(noisy, timesteps, states, return_dict=False)[0]
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weights = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 (Hang et al. 2023): faster convergence
        loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1 - decay)
        if step % 100 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step:5d} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
        if snapshot is not None and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.unet_steps:
            snapshot(ema, step + 1)  # a usable model exists long before the end of a long run
            save_unet_state(args.out, step + 1, unet, ema, text_encoder, optimizer, generator, args)
    return ema


# -- the whole training state, for --resume ------------------------------------------------------------------------


def state_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}-state")


def run_arguments(args) -> str:
    """The arguments that decide the result: a state is only resumed by the run that made it."""
    return json.dumps({k: str(v) for k, v in sorted(vars(args).items()) if k not in ("resume", "out")})


def save_vae_state(out: Path, vae, scaling: float, args) -> None:
    """The VAE stage's result, written once, before the UNet stage starts."""
    meta = {"scaling": repr(scaling), "arguments": run_arguments(args)}
    save_safetensors_atomic({k: v.contiguous() for k, v in vae.state_dict().items()},
                            state_dir(out) / "vae.safetensors", meta)


def save_unet_state(out: Path, step: int, unet, ema, text_encoder, optimizer, generator, args) -> None:
    """Everything the UNet stage's next step depends on, in one safetensors file written atomically (a kill while
    writing leaves the previous state)."""
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors |= {f"text.{k}": v for k, v in text_encoder.state_dict().items()}
    for index, moments in optimizer.state_dict()["state"].items():
        tensors |= {f"adam.{index}.{k}": torch.as_tensor(v).clone() for k, v in moments.items()}
    tensors["rng"] = generator.get_state()
    meta = {"step": str(step), "arguments": run_arguments(args)}
    save_safetensors_atomic({k: v.contiguous() for k, v in tensors.items()}, state_dir(out) / "unet.safetensors", meta)


def read_state(out: Path, name: str, args) -> tuple[dict, dict] | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = state_dir(out) / f"{name}.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    if meta.get("arguments") != run_arguments(args):
        raise SystemExit(f"train_base.py: --resume: {path} was made with other arguments ({meta.get('arguments')});"
                         " run with those, or without --resume to start over")
    return load_file(path), meta


def restore_unet_state(state, unet, ema, text_encoder, optimizer, generator) -> int:
    tensors, meta = state
    for prefix, module in (("unet.", unet), ("ema.", ema), ("text.", text_encoder)):
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    saved = optimizer.state_dict()
    for index in range(len(saved["param_groups"][0]["params"])):
        saved["state"][index] = {part: tensors[f"adam.{index}.{part}"] for part in ("step", "exp_avg", "exp_avg_sq")}
    optimizer.load_state_dict(saved)
    generator.set_state(tensors["rng"])
    return int(meta["step"])


def save_model(out: Path, vae, text_encoder, tokenizer, unet, scheduler, fp16: bool) -> None:
    pipe = pipeline_from_components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=copy.deepcopy(unet),
                                    scheduler=scheduler)
    if fp16:
        pipe = copy.deepcopy(pipe).to(torch.float16)  # the training copies stay fp32
    pipe.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-crop", type=int, default=32, help="VAE training crop (pixels, multiple of 4)")
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--unet-channels", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--unet-lr", type=float, default=6e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--noise-offset", type=float, default=0.25, help="per-channel offset noise (see train_unet)")
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights instead of fp16")
    parser.add_argument("--save-every", type=int, default=0,
                        help="every N UNet steps save the EMA model to OUT-stepN and the training state for --resume")
    parser.add_argument("--resume", action="store_true", help="continue from OUT-state (same arguments)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out.parent / f"{args.out.name}-train.log", "a" if args.resume else "w", encoding="utf-8")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    tokenizer = make_tokenizer(WORDS.split(), max_length=24)
    vae, unet, text_encoder, scheduler = build_models(args, tokenizer)
    log(f"parameters: vae {sum(p.numel() for p in vae.parameters()):,}, unet {sum(p.numel() for p in unet.parameters()):,},"
        f" text {sum(p.numel() for p in text_encoder.parameters()):,}; threads {torch.get_num_threads()}")
    started = time.perf_counter()
    vae_state = read_state(args.out, "vae", args) if args.resume else None
    unet_state = read_state(args.out, "unet", args) if args.resume else None
    if vae_state is None:
        scaling = train_vae(vae, args, log)
        save_vae_state(args.out, vae, scaling, args)
    else:  # the VAE stage finished before the stop
        vae.load_state_dict(vae_state[0])
        vae.eval()
        scaling = float(vae_state[1]["scaling"])
        log("resumed with the saved VAE")
    vae.register_to_config(scaling_factor=scaling)
    vae.requires_grad_(False)
    vae_seconds = time.perf_counter() - started
    pool = encode_pool(vae, tokenizer, args, scaling)

    def snapshot(ema_unet, step: int) -> None:
        save_model(args.out.with_name(f"{args.out.name}-step{step}"), vae, text_encoder, tokenizer, ema_unet,
                   scheduler, fp16=not args.fp32)
        log(f"saved snapshot at unet step {step}")

    ema = train_unet(unet, text_encoder, scheduler, pool, tokenizer, args, log, snapshot, resume_from=unet_state)
    total = time.perf_counter() - started
    save_model(args.out, vae, text_encoder, tokenizer, ema, scheduler, fp16=not args.fp32)
    # No paths in the record: it ships with the model.
    record = {"args": json.loads(run_arguments(args)), "vae_seconds": round(vae_seconds),
              "total_seconds": round(total), "latent_scaling_factor": scaling,
              "torch_threads": torch.get_num_threads(),
              "resumed_at_unet_step": int(unet_state[1]["step"]) if unet_state else None}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"done in {total / 60:.1f} min -> {args.out}")


if __name__ == "__main__":
    main()
