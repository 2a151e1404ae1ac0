"""One training run from a validated config: setup -> build -> fit -> save.

This is the glue between the modules: it checks the dataset before any model loads, builds the models, the LoRA
and the optimizer, restores a checkpoint when asked, runs `train.fit`, and implements the loop's hooks
(checkpoints, samples, the adapter file). The loop itself never sees a file format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sdlora import checkpoint, formats, inference, lora
from sdlora.config import RunConfig, dump_config
from sdlora.data import CaptionedImageDataset, ResumableBatchSampler, collate, discover
from sdlora.fileio import write_text_atomic
from sdlora.models import BaseModel, freeze, load_base_model, place, set_attention_backend
from sdlora.precision import resolve_mixed_precision, store_frozen_weights
from sdlora.quantize import quantize_frozen
from sdlora.speed import apply_speed_options, loader_options
from sdlora.train import TrainingParts, fit

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GENERATOR = "noise"


@dataclass
class RunResult:
    output_dir: Path
    adapter_path: Path
    losses: list[float]
    final_step: int
    samples: list[Path] = field(default_factory=list)


def _build_accelerator(config: RunConfig) -> Accelerator:
    precision = resolve_mixed_precision(config.train.mixed_precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision: fp16 needs a CUDA GPU; use 'no' (fp32) or 'bf16' on this machine")
    return Accelerator(mixed_precision=precision)


def _adapter_shape(config: RunConfig, targets: tuple[str, ...]) -> lora.AdapterShape:
    return lora.AdapterShape(config.lora.rank, config.lora.effective_alpha, targets, config.lora.dropout)


def _build_optimizer(config: RunConfig, unet_params, te_params) -> torch.optim.Optimizer:
    from sdlora.backends import adamw_8bit_class

    train = config.train
    groups = [{"params": unet_params, "lr": train.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": train.text_encoder_learning_rate or train.learning_rate})
    optimizer_class = adamw_8bit_class() if train.optimizer == "adamw8bit" else torch.optim.AdamW
    return optimizer_class(groups, betas=train.adam_betas, eps=train.adam_epsilon, weight_decay=train.weight_decay)


class RunHooks:
    """What happens between optimizer steps: log, checkpoint, sample. Only the main process writes files."""

    def __init__(self, run: TrainingRun):
        self.run = run

    def after_step(self, step: int, loss: float, lr: float) -> None:
        run, every = self.run, self.run.config.train.checkpoint_every
        if run.accelerator.is_main_process:
            with open(run.output_dir / "train_log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
        if every and step % every == 0 and step < run.config.train.steps:
            run.save_checkpoint(step)
        sample_every = run.config.sample.every
        if sample_every and step % sample_every == 0 and step < run.config.train.steps:
            run.render_samples(step)

    def should_stop(self) -> bool:
        return False


class TrainingRun:
    def __init__(self, config: RunConfig, base: BaseModel | None = None):
        """`base`: an already-built base model to train on instead of loading `config.model.base` (benchmarks)."""
        self.config = config
        self.output_dir = Path(config.output.dir)
        self.accelerator = _build_accelerator(config)
        self.weight_dtype = DTYPES[self.accelerator.mixed_precision]
        self._prebuilt_base = base
        self.parts: TrainingParts | None = None
        self.base: BaseModel | None = None

    # -- setup ---------------------------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        # The dataset is checked first: a bad folder fails in seconds, before a multi-GB model loads.
        records = discover(cfg.data.path, cfg.data.caption_extension, cfg.data.default_caption)
        self.dataset = CaptionedImageDataset(
            records, cfg.data.resolution, cfg.data.crop, cfg.data.random_flip, cfg.train.seed
        )
        set_seed(cfg.train.seed)
        if self._prebuilt_base is not None:
            base = self._prebuilt_base
            freeze(base)
        else:
            base = load_base_model(
                cfg.model.base, revision=cfg.model.revision, variant=cfg.model.variant,
                single_file_config=cfg.model.single_file_config,
            )
        self.base = base
        quantize_frozen({"unet": base.unet, "text_encoder": base.text_encoder}, cfg.model.quantize,
                        accelerator.device, self.weight_dtype)
        lora.attach(base.unet, _adapter_shape(cfg, cfg.lora.unet_targets))
        te_params = []
        if cfg.lora.train_text_encoder:
            lora.attach(base.text_encoder, _adapter_shape(cfg, cfg.lora.text_encoder_targets))
        place(base, accelerator.device, self.weight_dtype)
        lora.cast_lora_to_fp32(base.unet, base.text_encoder)
        store_frozen_weights(base.unet, cfg.train.weight_storage)
        store_frozen_weights(base.text_encoder, cfg.train.weight_storage)
        attention = set_attention_backend(base.unet, cfg.train.attention, accelerator.device)
        if cfg.train.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if cfg.lora.train_text_encoder:
                base.text_encoder.gradient_checkpointing_enable()
        apply_speed_options(base.unet, cfg.train.channels_last, cfg.train.compile)
        unet_params = lora.trainable_parameters(base.unet)
        if cfg.lora.train_text_encoder:
            te_params = lora.trainable_parameters(base.text_encoder)
        optimizer = _build_optimizer(cfg, unet_params, te_params)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
            num_training_steps=cfg.train.steps,
        )
        unet, text_encoder, optimizer = base.unet, base.text_encoder, optimizer
        if cfg.lora.train_text_encoder:
            unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        else:
            unet, optimizer = accelerator.prepare(unet, optimizer)
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
        self.parts = TrainingParts(
            accelerator=accelerator, unet=unet, text_encoder=text_encoder, vae=base.vae, tokenizer=base.tokenizer,
            noise_scheduler=base.scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler,
            params=unet_params + te_params, generator=generator,
            prediction_type=cfg.train.prediction_type or base.prediction_type, weight_dtype=self.weight_dtype,
            gradient_accumulation=cfg.train.gradient_accumulation, max_grad_norm=cfg.train.max_grad_norm,
            noise_offset=cfg.train.noise_offset, snr_gamma=cfg.train.snr_gamma,
            train_text_encoder=cfg.lora.train_text_encoder,
        )
        n_train = sum(p.numel() for p in self.parts.params)
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation * accelerator.num_processes
        log.info(
            "base %s (%s, %s target) | %d images | device %s, %s, attention %s | %d trainable LoRA params | "
            "world size %d x batch %d x accumulation %d = effective batch %d",
            base.source, base.family, self.parts.prediction_type, len(records), accelerator.device,
            accelerator.mixed_precision, attention, n_train, accelerator.num_processes, cfg.train.batch_size,
            cfg.train.gradient_accumulation, effective,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _trainable_by_name(self) -> dict[str, torch.nn.Parameter]:
        named = {}
        for prefix, module in (("unet", self.base.unet), ("text_encoder", self.base.text_encoder)):
            for name, param in module.named_parameters():
                if param.requires_grad:
                    named[f"{prefix}.{name}"] = param
        return named

    def save_checkpoint(self, step: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            parts = self.parts
            scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
            state = checkpoint.TrainingState(
                step=step, micro_step=step * parts.gradient_accumulation,
                trainable={k: p.data for k, p in self._trainable_by_name().items()},
                optimizer=parts.optimizer.state_dict(), lr_scheduler=parts.lr_scheduler.state_dict(),
                scaler=scaler, rng=checkpoint.capture_rng({GENERATOR: parts.generator}),
                extra={"world_size": self.accelerator.num_processes},
            )
            path = checkpoint.save_checkpoint(self.output_dir / "checkpoints", state, self.config.train.keep_checkpoints)
            log.info("checkpoint written: %s", path)
        self.accelerator.wait_for_everyone()

    def restore(self, resume: str) -> int:
        """Load `resume` ('latest' or a checkpoint folder) into the live objects; returns the step reached."""
        folder = self.output_dir / "checkpoints"
        path = checkpoint.latest_checkpoint(folder) if resume == "latest" else Path(resume)
        if path is None:
            raise checkpoint.CheckpointError(f"--resume latest: no complete checkpoint in {folder}")
        state = checkpoint.load_checkpoint(path)
        named = self._trainable_by_name()
        if set(named) != set(state.trainable):
            raise checkpoint.CheckpointError(
                f"{path}: its LoRA does not match this config (rank, targets or text-encoder training differ)"
            )
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(state.trainable[name])
        self.parts.optimizer.load_state_dict(state.optimizer)
        self.parts.lr_scheduler.load_state_dict(state.lr_scheduler)
        if state.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)
        checkpoint.restore_rng(state.rng, {GENERATOR: self.parts.generator})
        log.info("resumed from %s at step %d", path, state.step)
        return state.step

    # -- outputs -------------------------------------------------------------------------------------------------

    def adapter(self) -> formats.AdapterFile:
        cfg = self.config
        tensors = {"unet": lora.lora_state_dict(self.accelerator.unwrap_model(self.parts.unet))}
        if cfg.lora.train_text_encoder:
            tensors["text_encoder"] = lora.lora_state_dict(self.accelerator.unwrap_model(self.parts.text_encoder))
        shapes = {c: formats.shape_from_tensors(t, cfg.lora.effective_alpha) for c, t in tensors.items()}
        metadata = {
            "sdlora.base_model": self.base.source,
            "sdlora.family": self.base.family,
            "sdlora.prediction_type": self.parts.prediction_type,
            "sdlora.rank": str(cfg.lora.rank),
            "sdlora.alpha": str(cfg.lora.effective_alpha),
            "sdlora.training_config": json.dumps(cfg.to_dict(), sort_keys=True),
        }
        return formats.AdapterFile(tensors=tensors, shapes=shapes, metadata=metadata)

    def render_samples(self, step: int) -> Path | None:
        sample = self.config.sample
        if not sample.prompts or not self.accelerator.is_main_process:
            return None
        unet = self.accelerator.unwrap_model(self.parts.unet)
        text_encoder = self.accelerator.unwrap_model(self.parts.text_encoder)
        view = BaseModel(unet=unet, vae=self.base.vae, text_encoder=text_encoder, tokenizer=self.base.tokenizer,
                         scheduler=self.base.scheduler, source=self.base.source)
        pipe = inference.build_pipeline(view, device=self.accelerator.device, dtype=self.weight_dtype)
        unet.eval()
        images = []
        for prompt in sample.prompts:
            images += inference.generate(
                pipe, prompt, seed=sample.seed, steps=sample.steps, guidance_scale=sample.guidance_scale,
                negative_prompt=sample.negative_prompt, height=self.config.data.resolution,
                width=self.config.data.resolution,
            )
        unet.train()
        grid = inference.image_grid(images, columns=len(images), column_labels=[p[:24] for p in sample.prompts])
        path = self.output_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    def data_loader(self, start: int) -> DataLoader:
        """Batches from optimizer step `start` on, in the order an uninterrupted run would see them."""
        cfg, accelerator = self.config, self.accelerator
        sampler = ResumableBatchSampler(
            len(self.dataset), cfg.train.batch_size, cfg.train.seed, start=start * cfg.train.gradient_accumulation,
            num_replicas=accelerator.num_processes, rank=accelerator.process_index,
        )
        # Its own generator: a DataLoader otherwise draws a seed from torch's global RNG on every iter(), which
        # would shift LoRA-dropout randomness after a resume.
        return DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
            generator=torch.Generator().manual_seed(cfg.train.seed),
            **loader_options(cfg.data.num_workers, accelerator.device),
        )

    # -- run -----------------------------------------------------------------------------------------------------

    def fit(self, resume: str | None = None) -> RunResult:
        cfg, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.output_dir / "config.yaml", dump_config(cfg))
        start = self.restore(resume) if resume else 0
        if accelerator.is_main_process and not resume:
            (self.output_dir / "train_log.jsonl").unlink(missing_ok=True)
        loader = self.data_loader(start)
        progress = tqdm(total=cfg.train.steps, initial=start, desc="training", disable=not accelerator.is_main_process)
        losses = fit(self.parts, iter(loader), start, cfg.train.steps, RunHooks(self), progress)
        progress.close()
        final_step = start + len(losses)
        adapter_path = self.output_dir / f"{cfg.output.name}.safetensors"
        samples = []
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            formats.save_diffusers(adapter_path, self.adapter())
            log.info("adapter written: %s", adapter_path)
            sample_path = self.render_samples(final_step)
            samples = [sample_path] if sample_path else []
        if final_step < cfg.train.steps or cfg.train.checkpoint_every:
            self.save_checkpoint(final_step)
        accelerator.wait_for_everyone()
        return RunResult(self.output_dir, adapter_path, losses, final_step, samples)


def train(config: RunConfig, resume: str | None = None) -> RunResult:
    run = TrainingRun(config)
    run.build()
    return run.fit(resume)
