"""The optimizer over the LoRA parameters: AdamW, or bitsandbytes' 8-bit AdamW, with a text-encoder LR group."""

from __future__ import annotations

import torch

from sdlora.config import RunConfig


def build_optimizer(config: RunConfig, unet_params, te_params) -> torch.optim.Optimizer:
    from sdlora.models.backends import adamw_8bit_class

    train = config.train
    groups = [{"params": unet_params, "lr": train.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": train.text_encoder_learning_rate or train.learning_rate})
    optimizer_class = adamw_8bit_class() if train.optimizer == "adamw8bit" else torch.optim.AdamW
    return optimizer_class(groups, betas=train.adam_betas, eps=train.adam_epsilon, weight_decay=train.weight_decay)
