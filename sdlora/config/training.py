"""The `train:` and `safety:` sections: the optimizer, schedule, precision, memory levers and the divergence guard."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sdlora.config.section import Section


class TrainSection(Section):
    steps: int = Field(1000, ge=1, description="Optimizer steps to train for.")
    batch_size: int = Field(1, ge=1, description="Images per device per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, description="Learning rate of the UNet LoRA.")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="Text-encoder LoRA LR. Default: learning_rate.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule (diffusers' get_scheduler names).")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adamw_schedulefree", "adafactor", "lion", "lion8bit"] = Field(
        "adamw", description="prodigy, adamw_schedulefree and lion need the `optimizers` extra; adafactor comes with "
        "transformers; adamw8bit and lion8bit need bitsandbytes (CUDA). docs/steering.md says when to pick which."
    )
    optimizer_args: dict[str, float | int | bool | str] = Field(
        {}, description="Extra keyword arguments for the optimizer's constructor, e.g. {d_coef: 0.5} for prodigy or "
        "{warmup_steps: 100} for adamw_schedulefree (names as the optimizer's own package spells them)."
    )
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+ (Hayou et al. 2024): the B (up) matrices learn at this many times the "
        "learning rate; 16 is the paper's choice. null: one rate for A and B."
    )
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[float, float] = Field((0.9, 0.999))
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "no", description="Compute dtype of the frozen weights; auto: bf16 or fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="xformers is used only when installed on CUDA.")
    seed: int = Field(42, description="Seed for LoRA init, data order, crops, noise and timesteps.")
    noise_offset: float = Field(0.0, ge=0.0, description="Noise offset (Guttenberg 2023); ~0.05 helps very dark/light images.")
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is typical.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = Field(
        "l2", description="Per-element loss: l2 (mean squared error), l1, or pseudo-Huber (huber, smooth_l1) with "
        "threshold huber_c (Patel et al. 2024, as kohya and diffusers)."
    )
    huber_c: float = Field(0.1, gt=0, le=1, description="Threshold of the huber / smooth_l1 losses.")
    huber_schedule: Literal["constant", "exponential", "snr"] = Field(
        "snr", description="How huber_c varies with the timestep: constant, decaying exponentially, or by the SNR."
    )
    min_timestep: int = Field(0, ge=0, description="Smallest training timestep drawn (inclusive).")
    max_timestep: int | None = Field(
        None, ge=1, description="Largest training timestep drawn (exclusive). Default: the scheduler's count (1000)."
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="Training target; default: the base scheduler's prediction_type."
    )
    checkpoint_every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep (oldest are deleted).")
    distributed_timeout: float = Field(
        1800, ge=5, le=86400, description="Seconds a multi-process run waits in a collective for a silent peer before "
        "it stops; longer than the slowest main-process-only work (samples, checkpoints, caches)."
    )
    zero_terminal_snr: bool = Field(
        False, description="Rescale the noise schedule to zero terminal SNR (Lin et al. 2024); v-prediction only."
    )
    weight_storage: Literal["compute", "bf16", "fp8"] = Field(
        "compute", description="Dtype the frozen weights are stored in; each layer upcasts to the compute dtype."
    )
    channels_last: bool = Field(False, description="UNet convolutions in channels-last memory format.")
    compile: bool = Field(False, description="torch.compile the UNet (slow first step; faster later ones).")
    retain_host_memory: Literal["auto", "always", "never"] = Field(
        "auto", description="Keep freed CPU memory in the process (glibc) so steps stop page-faulting it back; "
        "auto: unless a memory saver (checkpointing, smaller weight storage, quantized base) is on."
    )

    @model_validator(mode="after")
    def _one_rate_for_prodigy(self) -> TrainSection:
        # prodigyopt refuses parameter groups with different rates: it estimates one step size for all of them.
        if self.optimizer == "prodigy" and self.lora_plus_ratio is not None:
            raise ValueError("train.lora_plus_ratio cannot be combined with train.optimizer=prodigy (Prodigy takes "
                             "one learning rate for every group): drop one of them")
        if self.optimizer == "prodigy" and self.text_encoder_learning_rate not in (None, self.learning_rate):
            raise ValueError("train.text_encoder_learning_rate must equal train.learning_rate with "
                             "train.optimizer=prodigy (Prodigy takes one learning rate for every group): drop it")
        return self

    @model_validator(mode="after")
    def _timestep_range(self) -> TrainSection:
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(
                f"train.min_timestep ({self.min_timestep}) must be below train.max_timestep ({self.max_timestep})"
            )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` in a file or on the command line means fp32.
        return "no" if value is False else value


class SafetySection(Section):
    nan_patience: int = Field(3, ge=1, description="Non-finite steps in a row (each skipped) before a rollback.")
    nan_lr_factor: float = Field(0.5, gt=0, lt=1, description="Learning-rate multiplier applied on each rollback.")
    nan_max_rollbacks: int = Field(
        2, ge=0, description="Rollbacks to the last good checkpoint before the run stops with a diagnosis."
    )
