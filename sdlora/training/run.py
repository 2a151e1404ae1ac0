"""One training run from a validated config: setup -> build -> fit -> save.

This is the glue between the modules: it checks the dataset before any model loads, builds the models, the LoRA
and the optimizer, restores a checkpoint when asked, runs `train.fit`, and implements the loop's hooks
(checkpoints, samples, the adapter file). The loop itself never sees a file format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sdlora.hub import card
from sdlora.training import checkpoint
from sdlora.training import distributed
from sdlora.models import families
from sdlora import formats
from sdlora import hub
from sdlora.models import lora
from sdlora.training import divergence
from sdlora.training import offload
from sdlora.training import artifacts
from sdlora.training import steplog
from sdlora.training import resume as run_state
from sdlora.config import RunConfig, dump_config
from sdlora.data import CaptionedImageDataset, ResumableBatchSampler, collate
from sdlora.data import cache, preflight
from sdlora.data.buckets import BucketBatchSampler
from sdlora.files.atomic import write_text_atomic
from sdlora.training.interrupt import GracefulStop
from sdlora.training.optim import build_optimizer
from sdlora.models import BaseModel, freeze, load_base_model, place, set_attention_backend
from sdlora.models.precision import load_dtype_for, resolve_mixed_precision, store_frozen_weights
from sdlora.models.quantize import quantize_frozen
from sdlora.training.lock import OutputLock
from sdlora.hostmem import apply_speed_options, loader_options, retention_wanted, settle_host_memory
from sdlora.training.loop import TrainingParts, fit

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunResult:
    output_dir: Path
    adapter_path: Path
    losses: list[float]
    final_step: int
    samples: list[Path] = field(default_factory=list)
    stopped_by: str | None = None  # signal name when a SIGINT/SIGTERM stopped the run early (resumable)


def _build_accelerator(config: RunConfig) -> Accelerator:
    precision = resolve_mixed_precision(config.train.mixed_precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision: fp16 needs a CUDA GPU; use 'no' (fp32) or 'bf16' on this machine")
    distributed.warn_on_precision_mismatch(precision)
    # accelerate owns the accumulation window so DDP, FSDP and DeepSpeed all skip the all-reduce inside it.
    return Accelerator(
        mixed_precision=precision, cpu=distributed.cpu_only_launch(),
        gradient_accumulation_steps=config.train.gradient_accumulation,
    )


def _adapter_shape(config: RunConfig, targets: tuple[str, ...]) -> lora.AdapterShape:
    return lora.AdapterShape(config.lora.rank, config.lora.effective_alpha, targets, config.lora.dropout)


class RunHooks:
    """What happens between optimizer steps: log, checkpoint, sample. Only the main process writes files."""

    def __init__(self, run: TrainingRun):
        self.run = run

    def after_step(self, step: int, loss: float, lr: float) -> None:
        run, every = self.run, self.run.config.train.checkpoint_every
        action = run.guard.record(step, loss, divergence.all_finite(run.parts.params))
        if run.accelerator.is_main_process:
            steplog.append_step(run.output_dir / "train_log.jsonl", step, loss, lr)
        if action is not None:  # rolling back or stopping: this step's state is not worth keeping
            return
        # Not in the middle of a run of skipped steps: a rollback must land before the trouble started.
        if every and step % every == 0 and step < run.config.train.steps and not run.guard.streak:
            run.save_checkpoint(step)
        sample_every = run.config.sample.every
        if sample_every and step % sample_every == 0 and step < run.config.train.steps:
            run.render_samples(step)

    def should_stop(self) -> bool:
        if self.run.guard.action is not None:
            return True
        accelerator = self.run.accelerator
        # Every process must stop at the same step: a signal seen by one is shared through accelerate's trigger.
        if self.run.stop.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()


class TrainingRun:
    def __init__(self, config: RunConfig, base: BaseModel | Callable[[torch.dtype], BaseModel] | None = None):
        """`base`: a base model to train on instead of loading `config.model.base` (benchmarks): built already, or
        a function that builds it given the dtype the UNet and text encoders would be loaded in."""
        self.config = config
        self.output_dir = Path(config.output.dir)
        self.accelerator = _build_accelerator(config)
        self.weight_dtype = DTYPES[self.accelerator.mixed_precision]
        self._prebuilt_base = base
        self.parts: TrainingParts | None = None
        self.base: BaseModel | None = None
        self.pusher: hub.CheckpointPusher | None = None
        self.resumed_samples: int | None = None
        self.data_origin = (0, 0)  # (step, samples seen) where this process's run began
        safety = config.safety
        self.guard = divergence.NumericGuard(safety.nan_patience, safety.nan_lr_factor, safety.nan_max_rollbacks)
        self.stop = GracefulStop()
        self._lock = OutputLock(self.output_dir)
        self._lr_factor = 1.0  # pending learning-rate cut, applied by the next restore (a rollback)

    # -- setup ---------------------------------------------------------------------------------------------------

    def build(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        self._hold_output_dir()
        # The dataset is checked first: a bad folder fails in seconds, before a multi-GB model loads.
        self.report = preflight.check(
            cfg.data, cfg.train.batch_size, cfg.train.gradient_accumulation, accelerator.num_processes,
            tokens=preflight.tokenizer_counter(cfg.model.base),
        )
        preflight.require_usable(self.report, cfg.train.batch_size, accelerator.num_processes)
        preflight.log_summary(self.report)
        records = self.report.records
        self.records = records
        self.dataset = CaptionedImageDataset(
            records, cfg.data.resolution, cfg.data.crop, cfg.data.random_flip, cfg.train.seed,
            buckets=self.report.buckets if cfg.data.bucketing.enabled else None, background=cfg.data.background,
        )
        set_seed(cfg.train.seed)
        frozen_dtype = load_dtype_for(cfg.train.weight_storage, self.weight_dtype, cfg.model.quantize)
        if self._prebuilt_base is not None:  # the benchmark hands in models built in memory
            base = self._prebuilt_base
            base = base(frozen_dtype) if callable(base) else base
            freeze(base)
        else:
            base = load_base_model(
                cfg.model.base, revision=cfg.model.revision, variant=cfg.model.variant,
                single_file_config=cfg.model.single_file_config, family=cfg.model.family,
                allow_pickle=cfg.model.allow_pickle, frozen_dtype=frozen_dtype,
            )
        self.base = base
        quantize_frozen({"unet": base.unet, **base.text_encoders}, cfg.model.quantize, accelerator.device,
                        self.weight_dtype)
        prediction_type = cfg.train.prediction_type or base.prediction_type
        if cfg.train.zero_terminal_snr:
            base.scheduler = families.with_zero_terminal_snr(base.scheduler, prediction_type)
        lora.attach(base.unet, _adapter_shape(cfg, cfg.lora.unet_targets))
        te_params = []
        # "Train the text encoder" means every text encoder of the base: SDXL's two (kohya's te1 / te2).
        trained_encoders = list(base.text_encoders.values()) if cfg.lora.train_text_encoder else []
        for encoder in trained_encoders:
            lora.attach(encoder, _adapter_shape(cfg, cfg.lora.text_encoder_targets))
        # Stored before placing: stored weights keep their dtype through place(), so the full-size frozen model
        # never exists (and a GPU receives half the bytes).
        for module in (base.unet, *base.text_encoders.values()):
            store_frozen_weights(module, cfg.train.weight_storage, self.weight_dtype)
        place(base, accelerator.device, self.weight_dtype)
        lora.cast_lora_to_fp32(base.unet, *base.text_encoders.values())
        attention = set_attention_backend(base.unet, cfg.train.attention, accelerator.device)
        if cfg.train.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            for encoder in trained_encoders:
                encoder.gradient_checkpointing_enable()
        apply_speed_options(base.unet, cfg.train.channels_last, cfg.train.compile)
        unet_params = lora.trainable_parameters(base.unet)
        for encoder in trained_encoders:
            te_params += lora.trainable_parameters(encoder)
        optimizer = build_optimizer(cfg, unet_params, te_params)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.train.lr_scheduler, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
            num_training_steps=cfg.train.steps,
        )
        distributed.check_strategy(accelerator, cfg)
        distributed.configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.max_grad_norm)
        unet, text_encoder, optimizer = base.unet, base.text_encoder, optimizer
        text_encoders = list(base.text_encoders.values())
        if cfg.lora.train_text_encoder:
            unet, *text_encoders, optimizer = accelerator.prepare(unet, *text_encoders, optimizer)
            text_encoder = text_encoders[0]
        else:
            unet, optimizer = accelerator.prepare(unet, optimizer)
        # The (wrapped) models whose LoRA is trained, by adapter-file component: what checkpoints and saves read.
        self.trained_models = {"unet": unet}
        if cfg.lora.train_text_encoder:
            self.trained_models.update(zip(base.text_encoders.keys(), text_encoders))
        # FSDP replaces parameters with sharded ones: clip what the optimizer now holds.
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        te_params = [
            p for name, model in self.trained_models.items() if name != "unet"
            for p in model.parameters() if p.requires_grad
        ]
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg.train.seed)
        self.parts = TrainingParts(
            accelerator=accelerator, unet=unet, text_encoder=text_encoder, vae=base.vae, tokenizer=base.tokenizer,
            noise_scheduler=base.scheduler, optimizer=optimizer, lr_scheduler=lr_scheduler,
            params=unet_params + te_params, generator=generator,
            prediction_type=prediction_type, weight_dtype=self.weight_dtype,
            gradient_accumulation=cfg.train.gradient_accumulation, max_grad_norm=cfg.train.max_grad_norm,
            noise_offset=cfg.train.noise_offset, snr_gamma=cfg.train.snr_gamma,
            train_text_encoder=cfg.lora.train_text_encoder,
            conditioning=families.conditioning_for(
                base.family, base.tokenizers, text_encoders, accelerator.device, cfg.lora.train_text_encoder
            ),
            trained_models=tuple(self.trained_models.values()),
        )
        self.released: dict[str, str] = {}
        if cfg.data.cache_latents or cfg.data.cache_text_embeddings:
            self.cache_stats = self._attach_caches()
            self.released = offload.release_cached_encoders(
                base, accelerator.device, latents_cached=cfg.data.cache_latents,
                text_cached=cfg.data.cache_text_embeddings, text_trained=cfg.lora.train_text_encoder,
                samples_wanted=bool(cfg.sample.prompts),
            )
        # After loading, caching and releasing: what those freed goes back to the OS; from here on (when wanted)
        # the steps' own working set stays in the process.
        savers = (cfg.train.gradient_checkpointing or cfg.train.weight_storage != "compute"
                  or cfg.model.quantize != "none")
        settle_host_memory(retention_wanted(cfg.train.retain_host_memory, savers))
        n_train = sum(p.numel() for p in self.parts.params)
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation * accelerator.num_processes
        log.info(
            "base %s (%s, %s target) | %d images | device %s, %s, attention %s | %d trainable LoRA params | "
            "world size %d x batch %d x accumulation %d = effective batch %d",
            base.source, base.family, self.parts.prediction_type, len(records), accelerator.device,
            accelerator.mixed_precision, attention, n_train, accelerator.num_processes, cfg.train.batch_size,
            cfg.train.gradient_accumulation, effective,
        )

    def _attach_caches(self) -> cache.CacheStats:
        """Encode every image / caption not cached yet; training then reads the cache and skips those encoders."""
        cfg, parts, base = self.config, self.parts, self.base
        vae = base.vae

        def encode_latents(pixels: torch.Tensor):
            dist = vae.encode(pixels.to(self.accelerator.device, dtype=vae.dtype)).latent_dist
            return dist.mean, dist.std

        folder = cfg.data.cache_dir or self.output_dir / "cache"
        encoders = list(base.text_encoders.values())
        accelerator = self.accelerator
        return cache.attach_caches(
            self.dataset, folder,
            latent_encoder=encode_latents if cfg.data.cache_latents else None,
            latent_model_key=f"{cache.module_fingerprint(vae)}:{vae.dtype}",
            # The family's own encoder: SDXL caches both encoders' states and the pooled embedding.
            text_encoder=parts.conditioning.encode_text if cfg.data.cache_text_embeddings else None,
            text_model_key=":".join(cache.module_fingerprint(e) for e in encoders)
            + f":{len(base.tokenizer)}:{base.tokenizer.model_max_length}:{self.weight_dtype}",
            batch_size=cfg.train.batch_size, progress=tqdm if accelerator.is_main_process else None,
            share=lambda work: distributed.shard_for_process(work, accelerator.num_processes,
                                                             accelerator.process_index),
            barrier=accelerator.wait_for_everyone,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _trainable_by_name(self) -> dict[str, torch.nn.Parameter]:
        return run_state.trainable_by_name(self.base)

    def save_checkpoint(self, step: int) -> None:
        run_state.save(self, step)

    def restore(self, resume: str) -> int:
        """Load `resume` ('latest' or a checkpoint folder) into the live objects; returns the step reached."""
        step, self.resumed_samples = run_state.restore(self, resume)
        if self._lr_factor != 1.0:  # a rollback lowered the learning rate: apply it to the restored schedule
            divergence.scale_learning_rate(self.parts.optimizer, self.parts.lr_scheduler, self._lr_factor)
            self._lr_factor = 1.0
        return step

    # -- outputs -------------------------------------------------------------------------------------------------

    def adapter(self) -> formats.AdapterFile:
        return artifacts.adapter_file(self)

    def render_samples(self, step: int) -> Path | None:
        return artifacts.render_samples(self, step)

    def data_loader(self, start: int) -> DataLoader:
        """Batches from optimizer step `start` on, in the order an uninterrupted run would see them (also after a
        resume on a different number of processes: the position is mapped from the samples seen)."""
        cfg, accelerator = self.config, self.accelerator
        position = start * cfg.train.gradient_accumulation
        if self.resumed_samples is not None:
            position = distributed.resume_micro_step(self.resumed_samples, run_state.layout(self))
        self.data_origin = (start, position * run_state.layout(self).global_micro_batch)
        sampler_class = ResumableBatchSampler
        size = len(self.dataset)
        if cfg.data.bucketing.enabled:
            sampler_class, size = BucketBatchSampler, self.dataset.item_buckets()
        sampler = sampler_class(
            size, cfg.train.batch_size, cfg.train.seed, start=position,
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

    def _hold_output_dir(self) -> None:
        if self.accelerator.is_main_process and not self._lock.held:
            self._lock.acquire()

    def fit(self, resume: str | None = None) -> RunResult:
        """Train under the output-folder lock and the signal handlers; roll back on divergence (see numeric.py)."""
        self._hold_output_dir()
        try:
            with self.stop:
                segments = []
                while True:
                    result = self._fit(resume)
                    segments.append(result)
                    if self.guard.action != divergence.ROLLBACK:
                        break
                    resume = self._roll_back()
        finally:
            self._lock.release()
        result.losses = steplog.join_segments(segments)
        result.stopped_by = self.stop.signal_name
        return result

    def _roll_back(self) -> str:
        target = checkpoint.latest_checkpoint(self.output_dir / "checkpoints")
        if target is None:
            self.guard.action = divergence.STOP
            raise divergence.NumericError(self.guard.diagnosis(self.parts.lr_scheduler.get_last_lr()[0], None))
        self._lr_factor = self.guard.lr_factor
        self.guard.rolled_back(int(checkpoint.CHECKPOINT_DIR.match(target.name).group(1)), self._lr_factor)
        return str(target)

    def _fit(self, resume: str | None) -> RunResult:
        cfg, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.output_dir / "config.yaml", dump_config(cfg))
            if cfg.hub.push_checkpoints and self.pusher is None:  # one pusher across rollback segments
                self.pusher = hub.CheckpointPusher(self.output_dir, cfg.hub.repo_id, cfg.hub.private)
        start = self.restore(resume) if resume else 0
        if accelerator.is_main_process and not resume:
            (self.output_dir / "train_log.jsonl").unlink(missing_ok=True)
        elif accelerator.is_main_process:  # steps after the checkpoint will run again: forget their log lines
            steplog.truncate(self.output_dir / "train_log.jsonl", start)
        loader = self.data_loader(start)
        progress = tqdm(total=cfg.train.steps, initial=start, desc="training", disable=not accelerator.is_main_process)
        losses = fit(self.parts, iter(loader), start, cfg.train.steps, RunHooks(self), progress)
        progress.close()
        final_step = start + len(losses)
        if self.guard.action == divergence.ROLLBACK:
            return RunResult(self.output_dir, Path(), losses, final_step)
        if self.guard.action == divergence.STOP:
            latest = checkpoint.latest_checkpoint(self.output_dir / "checkpoints")
            raise divergence.NumericError(
                self.guard.diagnosis(self.parts.lr_scheduler.get_last_lr()[0], str(latest) if latest else None)
            )
        adapter_path = self.output_dir / f"{cfg.output.name}.safetensors"
        samples = []
        accelerator.wait_for_everyone()
        adapter = self.adapter()  # every process: gathering under FSDP / DeepSpeed is collective
        if accelerator.is_main_process:
            divergence.require_finite(
                {f"{c}.{k}": t for c, tensors in adapter.tensors.items() for k, t in tensors.items()},
                f"adapter {adapter_path}",
            )
            formats.save_diffusers(adapter_path, adapter)
            log.info("adapter written: %s", adapter_path)
            if cfg.output.kohya:
                kohya_path = formats.save_kohya(self.output_dir / f"{cfg.output.name}_kohya.safetensors",
                                                adapter, title=cfg.output.name)
                log.info("kohya / A1111 / ComfyUI adapter written: %s", kohya_path)
            sample_path = None if self.stop.requested else self.render_samples(final_step)
            samples = [sample_path] if sample_path else []
            log.info("model card written: %s", card.write_card(self.output_dir, dataset_size=len(self.dataset)))
        if final_step < cfg.train.steps or cfg.train.checkpoint_every:
            self.save_checkpoint(final_step)
        if self.pusher is not None:
            self.pusher.submit_run()
            self.pusher.close()
        accelerator.wait_for_everyone()
        return RunResult(self.output_dir, adapter_path, losses, final_step, samples)


def train(config: RunConfig, resume: str | None = None) -> RunResult:
    run = TrainingRun(config)
    run.build()
    return run.fit(resume)
