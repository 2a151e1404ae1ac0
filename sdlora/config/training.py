"""The `train:` and `safety:` sections: the optimizer, schedule, precision, memory levers and the divergence guard."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

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
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit needs bitsandbytes (CUDA).")
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
