"""Data parallelism through accelerate: launch detection, strategy checks, gathering for saves, resume mapping.

The training loop is the same on 1 or N processes; what differs lives here. Every function that gathers
(`trainable_state`, `lora_tensors`) is a collective under FSDP and DeepSpeed: call it on every process, then let
only the main process write.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from accelerate.utils import DistributedType
from peft.utils import get_peft_model_state_dict

from sdlora.config import ConfigError, RunConfig
from sdlora.errors import UserError
from sdlora.models.precision import resolve_mixed_precision
from sdlora.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)

T = TypeVar("T")
SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED)


def cpu_only_launch() -> bool:
    """True when a multi-process launch (torchrun, `accelerate launch`) runs on a machine without an accelerator.

    accelerate picks its gloo CPU backend only when asked for `cpu=True`; without it, torchrun on CPU silently runs
    N independent single-process trainings that all write the same files.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and torch.accelerator.current_accelerator() is None


def build_accelerator(config: RunConfig):
    """The run's Accelerator: devices, mixed precision, the process group, and the accumulation window."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = resolve_mixed_precision(config.train.mixed_precision)
    warn_on_precision_mismatch(precision)
    # A machine that vanishes without closing its connections (power loss, a cut network, a frozen host) leaves
    # the others waiting in a collective for this long before they fail with PeerLostError.
    group = InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.distributed_timeout))
    # accelerate owns the accumulation window so DDP, FSDP and DeepSpeed all skip the all-reduce inside it.
    return Accelerator(
        mixed_precision=precision, cpu=cpu_only_launch(),
        gradient_accumulation_steps=config.train.gradient_accumulation, kwargs_handlers=[group],
    )


def is_sharded(accelerator) -> bool:
    """FSDP and DeepSpeed keep parameters or optimizer state split across processes; saving must gather."""
    return accelerator.distributed_type in SHARDED


def check_strategy(accelerator, config: RunConfig) -> None:
    """Refuse, before any step runs, combinations that accelerate cannot prepare or that sdlora cannot save."""
    kind = accelerator.distributed_type
    if not is_sharded(accelerator):
        return
    name = "DeepSpeed" if kind == DistributedType.DEEPSPEED else "FSDP"
    if kind == DistributedType.FSDP and config.sample.prompts:
        raise ConfigError(
            "sample.prompts: samples are rendered by the main process alone, which a model sharded by FSDP cannot "
            "do; generate from the saved adapter after training (sdlora generate) or use DDP / DeepSpeed ZeRO-2"
        )
    if config.lora.train_text_encoder:
        raise ConfigError(
            f"lora.train_text_encoder: {name} wraps one model per run, so it cannot train the text-encoder LoRA; "
            "use the DDP config (configs/accelerate/ddp.yaml) or set lora.train_text_encoder=false"
        )
    if config.train.checkpoint_every:
        raise ConfigError(
            f"train.checkpoint_every: resumable checkpoints are not written under {name} (its optimizer state is "
            "split across processes); use DDP for resumable runs or set train.checkpoint_every=0"
        )


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the DeepSpeed values that accelerate derives from a prepared DataLoader (sdlora shards data itself)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = batch_size
    # DeepSpeed clips inside engine.step; accelerator.clip_grad_norm_ is then only a read-out.
    ds_config["gradient_clipping"] = max_grad_norm or 0.0


def warn_on_precision_mismatch(precision: str) -> None:
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != precision:
        log.warning(
            "the accelerate config asks for mixed_precision=%s, but train.mixed_precision=%s decides; "
            "set train.mixed_precision to change it", launched, precision,
        )


# ---------------------------------------------------------------------------------------------------------------
# A lost machine or process

# What gloo and NCCL say when a peer's connection closes or a collective outlives the process group's timeout.
_PEER_LOSS = re.compile(
    r"Connection (closed|reset) by peer|Broken pipe|Timed out waiting|timed out after|[Ww]atchdog caught|"
    r"NCCL communicator was aborted|remote process exited"
)


class PeerLostError(UserError, RuntimeError):
    """Another process of a multi-process run died, froze or became unreachable; the survivors stop here."""


def raise_if_peer_lost(exc: BaseException, num_processes: int, checkpoints: Path) -> None:
    """Turn a collective's failure on a lost peer into one line that says how to go on (call in an `except`).

    Every other process stops with the same line; the launcher (accelerate / torchrun) then stops this machine's
    processes and exits non-zero. Checkpoints are written atomically by the main process, so the newest one is
    complete whichever machine died.
    """
    lost = isinstance(exc, (torch.distributed.DistNetworkError, torch.distributed.DistStoreError))
    if num_processes < 2 or not (lost or _PEER_LOSS.search(str(exc))):
        return
    cause = next((line.strip() for line in str(exc).splitlines() if _PEER_LOSS.search(line)), str(exc).strip())
    # gloo prefixes its source file and line, and follows with advice that the line below replaces.
    cause = re.sub(r"^\[[^\]]*\]\s*", "", cause).split(". ")[0][:200]
    latest = latest_checkpoint(checkpoints)
    where = (f"the newest checkpoint is {latest}; relaunch every machine with the same command plus --resume latest"
             if latest else f"no checkpoint was written in {checkpoints}; relaunch every machine to start again")
    raise PeerLostError(
        f"lost another process of this {num_processes}-process run (a machine or process died, froze for longer "
        f"than train.distributed_timeout, or the network failed: {cause}); {where}"
    ) from exc


# ---------------------------------------------------------------------------------------------------------------
# Gathering for saves


def _full_state(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model state on this process, gathered when sharded (collective under FSDP / DeepSpeed)."""
    if not is_sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)


def trainable_state(accelerator, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Trainable tensors as `<prefix>.<name>`, on CPU. Call on every process; complete on the main process."""
    result = {}
    for prefix, model in models.items():
        inner = accelerator.unwrap_model(model)
        trainable = [name for name, p in inner.named_parameters() if p.requires_grad]
        full = _full_state(accelerator, model)
        source = full if full is not None else dict(inner.named_parameters())
        for name in trainable:
            if name in source:
                result[f"{prefix}.{name}"] = source[name].detach().to("cpu", copy=True).contiguous()
    return result


def lora_tensors(accelerator, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft keys), unwrapped from DDP / FSDP / DeepSpeed. Call on every process."""
    inner = accelerator.unwrap_model(model)
    full = _full_state(accelerator, model)
    state = get_peft_model_state_dict(inner, state_dict=full, adapter_name=adapter_name,
                                      save_embedding_layers=False)  # as models.lora.lora_state_dict
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# Data position across world sizes


@dataclass(frozen=True)
class Layout:
    """How many samples one micro-step and one optimizer step consume across all processes."""

    world_size: int
    batch_size: int
    gradient_accumulation: int

    @property
    def global_micro_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def effective_batch(self) -> int:
        return self.global_micro_batch * self.gradient_accumulation


def resume_micro_step(samples_seen: int, layout: Layout) -> int:
    """The sampler position (in global micro-batches of `layout`) that continues after `samples_seen` samples.

    With the same effective batch the run continues at exactly the next unseen sample; otherwise at the last whole
    global micro-batch before it (a warning says how many samples are skipped over or repeated).
    """
    micro, remainder = divmod(samples_seen, layout.global_micro_batch)
    if remainder:
        log.warning(
            "resume: %d samples were seen, not a multiple of the new global micro-batch (%d processes x batch %d); "
            "continuing at sample %d, so %d sample(s) are seen again",
            samples_seen, layout.world_size, layout.batch_size, micro * layout.global_micro_batch, remainder,
        )
    return micro


def shard_for_process(items: Sequence[T], num_processes: int, process_index: int) -> list[T]:
    """This process's share of work that must be done once in total (e.g. filling a latent cache).

    Strided, so every process gets a near-equal share and no item (hence no cache file) belongs to two processes.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
    return list(items[process_index::num_processes])
