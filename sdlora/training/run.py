"""One training run from a validated config: setup -> build -> fit -> save.

This is the glue between the subpackages: it checks the dataset before any model loads, has `models.prepare` make
the base trainable, builds the optimizer, restores a checkpoint when asked, runs `loop.fit`, and implements the
loop's hooks (checkpoints, samples). The loop itself never sees a file format.

Publishing is not the run's job: whoever starts it hands in `publisher` (the CLI passes the Hub's, which writes the
model card and pushes checkpoints), so training never imports the Hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sdlora import command_line, formats
from sdlora.config import RunConfig, dump_config
from sdlora.data import CaptionedImageDataset, preflight
from sdlora.data.loader import training_loader
from sdlora.files.atomic import write_text_atomic
from sdlora.formats import lycoris_write
from sdlora.hostmem import retention_wanted, settle_host_memory
from sdlora.models import (
    BaseModel,
    caption_token_counter,
    freeze,
    load_base_model,
)
from sdlora.models.precision import (
    COMPUTE_DTYPES,
    load_dtype_for,
)
from sdlora.models.prepare import TrainableModels, prepare_for_training
from sdlora.training import (
    artifacts,
    checkpoint,
    distributed,
    divergence,
    offload,
    ownership,
    recovery,
    steplog,
    validation,
)
from sdlora.training.folder import RunFolder
from sdlora.training.hooks import Publisher, RunHooks, RunResult
from sdlora.training.initial_adapter import load_initial_adapter
from sdlora.training.interrupt import GracefulStop
from sdlora.training.lock import OutputLock
from sdlora.training.loop import TrainingParts, fit
from sdlora.training.monitor import Monitor
from sdlora.training.optim import evaluation_weights
from sdlora.training.parts import attach_caches, build_parts
from sdlora.training.resume import Checkpointer, DataPosition, trainable_by_name

log = logging.getLogger(__name__)


class TrainingRun:
    def __init__(self, config: RunConfig, base: BaseModel | Callable[[torch.dtype], BaseModel] | None = None,
                 publisher: Publisher | None = None):
        """`base`: a base model to train on instead of loading `config.model.base` (benchmarks): built already, or
        a function that builds it given the dtype the UNet and text encoders would be loaded in.
        `publisher`: the model card and Hub uploads (`sdlora.workflow.train` passes the Hub's); None writes only
        the run folder's own files."""
        if config.hub.push_checkpoints and publisher is None:
            raise ValueError("hub.push_checkpoints is set but this run has no publisher: start it with "
                             "sdlora.workflow.train (as `sdlora train` does)")
        self.config = config
        self.output_dir = Path(config.output.dir)
        self.folder = RunFolder(self.output_dir)
        self.accelerator = distributed.build_accelerator(config)
        self.weight_dtype = COMPUTE_DTYPES[self.accelerator.mixed_precision]
        self.publisher = publisher
        self._prebuilt_base = base
        self.parts: TrainingParts | None = None
        self.base: BaseModel | None = None
        safety = config.safety
        self.guard = divergence.NumericGuard(safety.nan_patience, safety.nan_lr_factor, safety.nan_max_rollbacks)
        self.stop = GracefulStop()
        self._lock = OutputLock(self.output_dir)
        self._lr_factor = 1.0  # pending learning-rate cut, applied by the next restore (a rollback)
        self.resumed_samples: int | None = None
        self.report: preflight.PreflightReport | None = None
        self._claimed: tuple[str | None] | None = None  # (resume,) the folder was claimed for (`prepare`)
        self._run_record: dict = {}

    # -- setup ---------------------------------------------------------------------------------------------------

    def prepare(self, resume: str | None = None, overwrite: bool = False) -> None:
        """Before any model loads: hold the output folder, check the dataset, and claim the folder for this run
        (`ownership.claim`: resume only from a checkpoint of this config and data; a new run only into a folder
        without another run's checkpoints or adapter, unless `overwrite`, which deletes them first)."""
        with recovery.guarded(self, self._lock):
            self._hold_output_dir()
            if self.report is None:
                self.dataset = self._check_dataset()  # a bad folder fails in seconds, before a multi-GB model loads
            if self.accelerator.is_main_process:  # the one writer decides (and an overwrite deletes) alone
                self._run_record = ownership.claim(self.folder, self.config, self.records, resume, overwrite)
            self._claimed = (resume,)
            if self.parts is not None:
                self.checkpointer.run = self._run_record

    def build(self) -> None:
        with recovery.guarded(self, self._lock):
            self._build()

    def _build(self) -> None:
        cfg, accelerator = self.config, self.accelerator
        self._hold_output_dir()
        self.monitor = Monitor(cfg, self.folder, accelerator)  # validation, EMA, live logs (monitor.py)
        if self.report is None:
            self.dataset = self._check_dataset()  # a bad folder fails in seconds, before a multi-GB model loads
        set_seed(cfg.train.seed)
        self.base = self._load_base()
        models = prepare_for_training(self.base, cfg, accelerator.device, self.weight_dtype)
        if cfg.lora.init_from is not None:  # continue from an adapter file (initial_adapter.py)
            load_initial_adapter(cfg.lora, {"unet": self.base.unet, **models.trained_encoders})
        self.parts, self.trained_models = build_parts(cfg, accelerator, models, self.weight_dtype)
        self.checkpointer = Checkpointer(
            self.folder.checkpoints, cfg.train.keep_checkpoints, accelerator, self.parts, self.trained_models,
            trainable_by_name({self.base.denoiser_component: self.base.unet, **self.base.text_encoders}),
            DataPosition(distributed.Layout(accelerator.num_processes, cfg.train.batch_size,
                                            cfg.train.gradient_accumulation)),
            cfg.train.batch_size,
            on_saved=self.publisher.checkpoint_written if self.publisher is not None else None,
            run=self._run_record,
        )
        self.samples = artifacts.SampleRenderer(
            cfg.sample, cfg.data.resolution, self.base, accelerator.unwrap_model(self.parts.unet),
            accelerator.unwrap_model(self.parts.text_encoder), accelerator.device, self.weight_dtype,
            self.folder,
        )
        self.monitor.attach(self.parts, self.held_out, self.checkpointer.trainable, self.checkpointer.components,
                            self.adapter)
        self.released: dict[str, str] = {}
        if cfg.data.cache_latents or cfg.data.cache_text_embeddings:
            self.cache_stats = attach_caches(cfg, self.parts, self.base, accelerator, self.dataset,
                                             cfg.data.cache_dir or self.folder.cache, self.weight_dtype)
            self.released = offload.release_cached_encoders(
                self.base, accelerator.device, latents_cached=cfg.data.cache_latents,
                text_cached=cfg.data.cache_text_embeddings, text_trained=cfg.lora.train_text_encoder,
                samples_wanted=bool(cfg.sample.prompts),
            )
        # A process-wide setting, made here on purpose: after loading, caching and releasing, what those freed goes
        # back to the OS; from here on (when wanted) the steps' own working set stays in the process.
        savers = (cfg.train.gradient_checkpointing or cfg.train.weight_storage != "compute"
                  or cfg.model.quantize != "none")
        settle_host_memory(retention_wanted(cfg.train.retain_host_memory, savers))
        self._log_summary(models)

    def _check_dataset(self) -> CaptionedImageDataset:
        cfg = self.config
        self.report = preflight.check(
            cfg.data, cfg.train.batch_size, cfg.train.gradient_accumulation, self.accelerator.num_processes,
            tokens=caption_token_counter(cfg.model),
        )
        # The check a user can paste: this run's folder, base and resolution, spelt to run as printed (a run over
        # several sources is checked with its own config file, whose path the run does not know).
        check = (command_line("dataset", "check", str(cfg.data.path), f"model.base={cfg.model.base}",
                              f"data.resolution={cfg.data.resolution}")
                 if not cfg.data.sources else "sdlora dataset check YOUR_CONFIG.yaml")
        preflight.require_usable(self.report, cfg.train.batch_size, self.accelerator.num_processes, check)
        preflight.log_summary(self.report, check)
        self.held_out = validation.split(cfg, self.report, self.accelerator.num_processes)  # never trained on
        self.records = self.held_out.train_records
        return CaptionedImageDataset(
            self.records, cfg.data.resolution, cfg.data.crop, cfg.data.random_flip, cfg.train.seed,
            buckets=self.held_out.train_buckets if cfg.data.bucketing.enabled else None,
            background=cfg.data.background, regularization_ratio=cfg.data.regularization.ratio,
            prior_loss_weight=cfg.data.regularization.prior_loss_weight,
            masked=cfg.data.masked_loss, mask_from_alpha=cfg.data.mask_from_alpha,
        )

    def _load_base(self) -> BaseModel:
        model = self.config.model
        frozen_dtype = load_dtype_for(self.config.train.weight_storage, self.weight_dtype, model.quantize)
        if self._prebuilt_base is None:
            return load_base_model(
                model.base, revision=model.revision, variant=model.variant,
                single_file_config=model.single_file_config, family=model.family,
                allow_pickle=model.allow_pickle, frozen_dtype=frozen_dtype, use_t5=model.t5,
            )
        base = self._prebuilt_base  # the benchmark hands in models built in memory
        base = base(frozen_dtype) if callable(base) else base
        freeze(base)
        return base

    def _log_summary(self, models: TrainableModels) -> None:
        cfg, accelerator, base = self.config, self.accelerator, self.base
        effective = cfg.train.batch_size * cfg.train.gradient_accumulation * accelerator.num_processes
        log.info(
            "base %s (%s, %s target) | %d images | device %s, %s, attention %s | %d trainable LoRA params | "
            "world size %d x batch %d x accumulation %d = effective batch %d",
            base.source, base.family, models.prediction_type, len(self.records), accelerator.device,
            accelerator.mixed_precision, models.attention, sum(p.numel() for p in self.parts.params),
            accelerator.num_processes, cfg.train.batch_size, cfg.train.gradient_accumulation, effective,
        )

    # -- checkpoints and outputs ---------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        self.checkpointer.save(step)
        self._write_config()

    def _write_config(self) -> None:
        """config.yaml, written only once a checkpoint or the adapter is safely down: a run that fails before
        (a full disk, a refused resume) leaves the folder's previous config as it was."""
        if self.accelerator.is_main_process:
            text = dump_config(self.config)
            if not (self.folder.config.is_file() and self.folder.config.read_text(encoding="utf-8") == text):
                write_text_atomic(self.folder.config, text)

    def restore(self, resume: str) -> int:
        """Load `resume` ('latest' or a checkpoint folder) into the live objects; returns the step reached."""
        step, self.resumed_samples = self.checkpointer.restore(resume)
        if self._lr_factor != 1.0:  # a rollback lowered the learning rate: apply it to the restored schedule
            divergence.scale_learning_rate(self.parts.optimizer, self.parts.lr_scheduler, self._lr_factor)
            self._lr_factor = 1.0
        return step

    def adapter(self) -> formats.AdapterFile:
        """The trained LoRA with its metadata. Call on every process: gathering under FSDP / DeepSpeed is collective."""
        with evaluation_weights(self.parts.optimizer):  # schedule-free: save the averaged weights
            return artifacts.adapter_file(self.accelerator, self.trained_models, self.config, self.base,
                                          self.parts.prediction_type, self.records)

    def render_samples(self, step: int) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        # Samples show what a user would get: schedule-free's averaged weights, and the EMA when asked for.
        with evaluation_weights(self.parts.optimizer), self.monitor.sample_weights():
            path = self.samples.render(step)
        self.monitor.sample_rendered(step, path)
        return path

    def data_loader(self, start: int) -> DataLoader:
        """Batches from optimizer step `start` on, in the order an uninterrupted run would see them (also after a
        resume on a different number of processes: the position is mapped from the samples seen)."""
        cfg, accelerator, position = self.config, self.accelerator, self.checkpointer.position
        micro_step = start * cfg.train.gradient_accumulation
        if self.resumed_samples is not None:
            micro_step = distributed.resume_micro_step(self.resumed_samples, position.layout)
        position.origin = (start, micro_step * position.layout.global_micro_batch)
        return training_loader(
            self.dataset, bucketed=cfg.data.bucketing.enabled, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
            start=micro_step, num_workers=cfg.data.num_workers, num_replicas=accelerator.num_processes,
            rank=accelerator.process_index, device=accelerator.device,
        )

    # -- run -----------------------------------------------------------------------------------------------------

    def _hold_output_dir(self) -> None:
        if self.accelerator.is_main_process and not self._lock.held:
            self._lock.acquire()

    def fit(self, resume: str | None = None) -> RunResult:
        """Train under the output-folder lock and the signal handlers; roll back on divergence (see divergence.py).
        The folder is claimed for `resume` here unless `prepare` already did."""
        if self._claimed != (resume,):
            self.prepare(resume)
        with recovery.guarded(self, self._lock):
            self._hold_output_dir()
            with self.stop:
                segments = []
                while True:
                    result = self._fit(resume)
                    segments.append(result)
                    if self.guard.action != divergence.ROLLBACK:
                        break
                    resume = self._roll_back()
        self._lock.release()
        result.losses = steplog.join_segments(segments)
        result.stopped_by = self.stop.signal_name
        return result

    def _roll_back(self) -> str:
        target = checkpoint.latest_checkpoint(self.folder.checkpoints)
        if target is None:
            self.guard.action = divergence.STOP
            raise divergence.NumericError(self.guard.diagnosis(self.parts.lr_scheduler.get_last_lr()[0], None))
        self._lr_factor = self.guard.lr_factor
        self.guard.rolled_back(int(checkpoint.CHECKPOINT_DIR.match(target.name).group(1)), self._lr_factor)
        return str(target)

    def _fit(self, resume: str | None) -> RunResult:
        cfg, accelerator, folder = self.config, self.accelerator, self.folder
        if accelerator.is_main_process:
            folder.root.mkdir(parents=True, exist_ok=True)
        start = self.restore(resume) if resume else 0
        if accelerator.is_main_process and not resume:
            folder.step_log.unlink(missing_ok=True)
        elif accelerator.is_main_process:  # steps after the checkpoint will run again: forget their log lines
            steplog.truncate(folder.step_log, start)
        loader = self.data_loader(start)
        self.monitor.begin(start)
        progress = tqdm(total=cfg.train.steps, initial=start, desc="training", disable=not accelerator.is_main_process)
        try:
            losses = fit(self.parts, iter(loader), start, cfg.train.steps, RunHooks(self), progress)
        finally:
            progress.close()  # ends the bar's line: an error printed next starts a line of its own
        final_step = start + len(losses)
        if self.guard.action == divergence.ROLLBACK:
            return RunResult(self.output_dir, Path(), losses, final_step)
        if self.guard.action == divergence.STOP:
            latest = checkpoint.latest_checkpoint(folder.checkpoints)
            raise divergence.NumericError(
                self.guard.diagnosis(self.parts.lr_scheduler.get_last_lr()[0], str(latest) if latest else None)
            )
        # The last checkpoint before the adapter: a disk that fills up while the adapter or the files after it are
        # written loses no step, and `--resume latest` finishes them (a resume at the final step trains nothing).
        if losses and (final_step < cfg.train.steps or cfg.train.checkpoint_every):
            self.save_checkpoint(final_step)
        adapter_path = folder.adapter(cfg.output.name)
        samples = []
        accelerator.wait_for_everyone()
        adapter = self.adapter()  # every process: gathering under FSDP / DeepSpeed is collective
        self.monitor.write_ema_adapter(self.adapter)
        if accelerator.is_main_process:
            divergence.require_finite(
                {f"{c}.{k}": t for c, tensors in adapter.tensors.items() for k, t in tensors.items()},
                f"adapter {adapter_path}",
            )
            lycoris_write.save_trained(adapter_path, adapter, title=cfg.output.name)
            log.info("adapter written: %s", adapter_path)
            self._write_config()
            if cfg.output.kohya:
                kohya_path = formats.save_kohya(folder.kohya_adapter(cfg.output.name), adapter, title=cfg.output.name)
                log.info("kohya / A1111 / ComfyUI adapter written: %s", kohya_path)
            sample_path = None if self.stop.requested else self.render_samples(final_step)
            samples = [sample_path] if sample_path else []
        self.monitor.finish()
        if self.publisher is not None and accelerator.is_main_process:
            self.publisher.run_finished(folder, len(self.dataset))
        accelerator.wait_for_everyone()
        return RunResult(self.output_dir, adapter_path, losses, final_step, samples)


def train(config: RunConfig, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """The run alone: the run folder's files, no model card, no uploads (`sdlora.workflow.train` adds those)."""
    run = TrainingRun(config)
    run.prepare(resume, overwrite)
    run.build()
    return run.fit(resume)
