"""The optimizer over the LoRA parameters, with a text-encoder LR group and LoRA+ groups for the B matrices.

AdamW is torch's; the others come from optional packages, imported only when chosen, each with one clear line
naming the extra when missing: Prodigy (`prodigyopt`), schedule-free AdamW (`schedulefree`), Lion
(`lion-pytorch`), Adafactor (transformers, always installed), 8-bit AdamW and Lion (bitsandbytes, CUDA).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Sequence

import torch

from sdlora.config import ConfigError, RunConfig

NamedParams = Sequence[tuple[str, torch.nn.Parameter]]

# optimizer name -> (module, class, extra that installs it)
_OPTIONAL = {
    "prodigy": ("prodigyopt", "Prodigy", "optimizers"),
    "adamw_schedulefree": ("schedulefree", "AdamWScheduleFree", "optimizers"),
    "lion": ("lion_pytorch", "Lion", "optimizers"),
    "adafactor": ("transformers.optimization", "Adafactor", None),
}


def _optional_class(name: str):
    module_name, class_name, extra = _OPTIONAL[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"train.optimizer: {name} needs the {module_name.split('.')[0]} package: `pip install sdlora[{extra}]`, "
            "or set train.optimizer=adamw"
        ) from None
    return getattr(module, class_name)


def is_lora_b(name: str) -> bool:
    """peft names a LoRA's up matrix `lora_B` (and `lora_embedding_B`); LoRA+ gives those the higher rate."""
    return ".lora_B." in name or ".lora_embedding_B." in name or name.startswith("lora_B.")


def param_groups(named: NamedParams, lr: float, lora_plus_ratio: float | None) -> list[dict]:
    """One group at `lr`; with LoRA+ (Hayou, Ghosh, Yu, "LoRA+", 2024) a second group of the B matrices at
    `lora_plus_ratio` x `lr`: B starts at zero and the paper shows it should learn faster than A."""
    if lora_plus_ratio is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    groups = [
        {"params": [p for n, p in named if not is_lora_b(n)], "lr": lr},
        {"params": [p for n, p in named if is_lora_b(n)], "lr": lr * lora_plus_ratio},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(config: RunConfig, unet_params: NamedParams, te_params: NamedParams) -> torch.optim.Optimizer:
    """`unet_params` / `te_params`: (name, parameter) pairs of the trainable LoRA weights."""
    train = config.train
    groups = param_groups(unet_params, train.learning_rate, train.lora_plus_ratio)
    if te_params:
        te_lr = train.text_encoder_learning_rate or train.learning_rate
        groups += param_groups(te_params, te_lr, train.lora_plus_ratio)
    try:
        return _construct(train.optimizer, groups, train, dict(train.optimizer_args))
    except TypeError as exc:  # an optimizer_args name the optimizer does not take
        if not train.optimizer_args:
            raise
        raise ConfigError(f"train.optimizer_args: {train.optimizer} refused them ({exc}); use the argument names "
                          "of its own package") from None


def _construct(name: str, groups: list[dict], train, extra: dict) -> torch.optim.Optimizer:
    def kwargs(**base):
        return {**base, **extra}  # optimizer_args win over the train: fields

    adam_like = dict(betas=train.adam_betas, weight_decay=train.weight_decay)
    if name in ("adamw", "adamw8bit"):
        from sdlora.models.backends import adamw_8bit_class

        optimizer_class = adamw_8bit_class() if name == "adamw8bit" else torch.optim.AdamW
        return optimizer_class(groups, **kwargs(eps=train.adam_epsilon, **adam_like))
    if name == "lion8bit":
        from sdlora.models.backends import bitsandbytes_available

        if not bitsandbytes_available():
            raise ConfigError("train.optimizer: lion8bit needs bitsandbytes: `pip install sdlora[bnb]` (CUDA), "
                              "or set train.optimizer=lion")
        import bitsandbytes

        return bitsandbytes.optim.Lion8bit(groups, **kwargs(**adam_like))
    optimizer_class = _optional_class(name)
    if name == "prodigy":
        # Prodigy estimates the step size itself; learning_rate scales its estimate (1.0 is the authors' advice).
        return optimizer_class(groups, **kwargs(eps=train.adam_epsilon, **adam_like))
    if name == "adamw_schedulefree":
        # Its own warm-up: schedule-free replaces the LR schedule (Defazio et al., "The Road Less Scheduled", 2024).
        return optimizer_class(groups, **kwargs(eps=train.adam_epsilon, warmup_steps=train.lr_warmup_steps,
                                                **adam_like))
    if name == "lion":
        return optimizer_class(groups, **kwargs(**adam_like))
    # Adafactor with an explicit learning rate: its relative-step mode would ignore learning_rate and the schedule.
    return optimizer_class(groups, **kwargs(scale_parameter=False, relative_step=False, warmup_init=False,
                                            weight_decay=train.weight_decay))


def set_train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Schedule-free optimizers keep the weights at a training point between steps; put them there. A no-op for
    every other optimizer (accelerate's wrapper forwards it only when the inner optimizer has one)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if hasattr(inner, "train"):
        optimizer.train()


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block the model holds the weights to use and save. For schedule-free that is the averaged point,
    not the one gradients are taken at; the training point is put back after."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not hasattr(inner, "eval"):
        yield
        return
    # train() recomputes the training point from the average by arithmetic that need not round back to the same
    # bits: the exact tensors are put back instead, so rendering samples never moves the run.
    params = [p for group in inner.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, exact in zip(params, saved):
                param.copy_(exact)
