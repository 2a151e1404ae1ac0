"""The model card (README.md) of a run folder: the Hub's LoRA front matter, then how to use the adapter anywhere.

Everything on the card is read back from the run folder (config.yaml, the adapter headers, samples/,
train_log.jsonl), so `sdlora card RUN_DIR` rebuilds the same card the end of training wrote. The card is built
with huggingface_hub's `ModelCard` / `ModelCardData`: the front matter is YAML that the Hub validates, never
pasted strings. The card is published, so it names the base by its hub id, or a local base by its folder or file
name only (`config.names.public_name`), never by a local path.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from sdlora import formats
from sdlora.config import ConfigError, RunConfig, read_config_file, validate_config
from sdlora.config.names import BUILTIN_PREFIX, RepoIdError, check_repo_id, is_repo_id, public_name
from sdlora.errors import UserError
from sdlora.files.atomic import write_text_atomic
from sdlora.hub.card_template import TEMPLATE
from sdlora.models import families
from sdlora.training.folder import RunFolder

log = logging.getLogger(__name__)

class CardError(UserError, ValueError):
    """A run folder a card cannot be written for; the message names the folder and what is missing."""


@dataclass
class AdapterInfo:
    name: str  # file name in the run folder (and in the repo)
    format: str  # "diffusers" or "kohya"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class RunFacts:
    """What a card says about a run, gathered from its folder."""

    config: RunConfig
    adapters: list[AdapterInfo]
    samples: list[str]  # repo-relative paths, oldest first
    dataset_size: int | None
    final_loss: float | None
    steps_done: int | None
    loss_steps: int = 0  # how many logged steps final_loss is the mean of

    @property
    def base_kind(self) -> str:
        """'hub' (a hub id, or output.base_model_id), 'builtin' (sdlora:NAME) or 'local' (a folder or file name)."""
        if self.base_model:
            return "hub"
        return "builtin" if self.base_name.startswith(BUILTIN_PREFIX) else "local"

    @property
    def primary(self) -> AdapterInfo:
        """The diffusers file named by output.name (what `load_lora_weights` takes), else the first file."""
        wanted = f"{self.config.output.name}.safetensors"
        return next((a for a in self.adapters if a.name == wanted), self.adapters[0])

    @property
    def kohya(self) -> AdapterInfo | None:
        """The kohya copy of output.name's adapter (not, say, the EMA's `<name>_ema_kohya`), else the first one."""
        found = [a for a in self.adapters if a.format == "kohya"]
        wanted = f"{self.config.output.name}_kohya.safetensors"
        return next((a for a in found if a.name == wanted), found[0] if found else None)

    @property
    def family(self) -> str:
        return self.primary.metadata.get("sdlora.family", "sd1")

    @property
    def base_name(self) -> str:
        """The base as it may be published: its hub id or built-in name, or a local folder's or file's name."""
        return public_name(self.primary.metadata.get("sdlora.base_model", self.config.model.base))

    @property
    def base_model(self) -> str | None:
        """A hub id for the card's base_model; a local folder or file is not one (the Hub rejects it)."""
        if self.config.output.base_model_id:
            return self.config.output.base_model_id
        return self.base_name if is_repo_id(self.base_name) else None


def _read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CardError(f"{path}: not a readable safetensors file: {exc}") from None


def adapter_files(run_dir: Path) -> list[Path]:
    """Every top-level .safetensors in a run folder is an adapter (diffusers and, when exported, kohya)."""
    return sorted(p for p in Path(run_dir).glob("*.safetensors") if p.is_file() and not p.name.startswith("."))


def sample_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in RunFolder(Path(run_dir)).samples.glob("*.png") if p.is_file())


def _load_run_config(run_dir: Path) -> RunConfig:
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise CardError(f"{run_dir}: no config.yaml; is this a finished sdlora run folder (output.dir)?")
    try:
        return validate_config(read_config_file(path), source=str(path))
    except ConfigError as exc:
        raise CardError(str(exc)) from None


def _losses(run_dir: Path) -> list[dict]:
    path = RunFolder(run_dir).step_log
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _count_images(config: RunConfig) -> int | None:
    from sdlora.data import DatasetError, discover

    try:
        return len(discover(config.data.path, config.data.caption_extension, config.data.default_caption, verify=False))
    except DatasetError:
        return None  # the dataset is not on this machine; the card says "not recorded"


LOSS_WINDOW = 20  # the card's final loss: the mean of the last this-many logged steps (fewer in a shorter run)


def gather(run_dir: str | Path, dataset_size: int | None = None) -> RunFacts:
    run_dir = Path(run_dir)
    config = _load_run_config(run_dir)
    adapters = []
    for path in adapter_files(run_dir):
        keys, metadata = _read_header(path)
        adapters.append(AdapterInfo(path.name, formats.detect_format(keys), metadata))
    if not adapters:
        raise CardError(f"{run_dir}: no adapter (.safetensors) in the run folder; train first")
    log_rows = _losses(run_dir)
    # Skipped (non-finite) steps are logged with loss null.
    tail = [row["loss"] for row in log_rows[-LOSS_WINDOW:] if row.get("loss") is not None]
    return RunFacts(
        config=config, adapters=adapters,
        samples=[p.relative_to(run_dir).as_posix() for p in sample_files(run_dir)],
        dataset_size=dataset_size if dataset_size is not None else _count_images(config),
        final_loss=sum(tail) / len(tail) if tail else None,
        steps_done=log_rows[-1]["step"] if log_rows else None, loss_steps=len(tail),
    )


def card_data(facts: RunFacts) -> ModelCardData:
    """The YAML front matter the Hub reads for a LoRA text-to-image repo."""
    out, prompts = facts.config.output, facts.config.sample.prompts
    widget = []
    if facts.samples and prompts:
        # Each final grid holds one column per prompt; every prompt points at the latest grid.
        widget = [{"text": prompt, "output": {"url": facts.samples[-1]}} for prompt in prompts]
    return ModelCardData(
        base_model=facts.base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        **families.hub_license(out.license or families.TABLE[facts.family].license),
        tags=["text-to-image", families.TABLE[facts.family].hub_tag, "diffusers", "lora", "template:sd-lora", "sdlora"],
        instance_prompt=", ".join(out.trigger_words) or None,
        widget=widget or None,
    )


def _settings(facts: RunFacts) -> list[tuple[str, str]]:
    cfg = facts.config
    rows = [
        ("base model", f"`{facts.base_name}` ({facts.family})"),
        ("dataset size", f"{facts.dataset_size} images" if facts.dataset_size is not None else "not recorded"),
        ("resolution", f"{cfg.data.resolution} px, {cfg.data.crop} crop" + (", random flip" if cfg.data.random_flip else "")),
        ("steps", str(facts.steps_done if facts.steps_done is not None else cfg.train.steps)),
        ("batch size", f"{cfg.train.batch_size} x {cfg.train.gradient_accumulation} accumulation"),
        ("rank / alpha", f"{cfg.lora.rank} / {cfg.lora.effective_alpha:g}"),
        *([("adapter type", cfg.lora.type + (f", LoCon convolutions at rank {cfg.lora.conv_rank} / alpha "
                                              f"{cfg.lora.effective_conv_alpha:g}" if cfg.lora.conv_rank else ""))]
          if cfg.lora.type != "lora" or cfg.lora.conv_rank else []),
        *([("transformer targets", ", ".join(cfg.lora.transformer_targets))] if facts.family == "sd3"
          else [("UNet targets", ", ".join(cfg.lora.unet_targets))]),
        ("text encoder", "trained (" + ", ".join(cfg.lora.text_encoder_targets) + ")" if cfg.lora.train_text_encoder else "frozen"),
        ("optimizer", f"{cfg.train.optimizer}, lr {cfg.train.learning_rate:g}, {cfg.train.lr_scheduler} schedule"),
        ("precision", cfg.train.mixed_precision if cfg.train.mixed_precision != "no" else "fp32"),
        ("seed", str(cfg.train.seed)),
    ]
    if cfg.train.snr_gamma:
        rows.append(("min-SNR gamma", f"{cfg.train.snr_gamma:g}"))
    if cfg.train.noise_offset:
        rows.append(("noise offset", f"{cfg.train.noise_offset:g}"))
    if facts.final_loss is not None:
        # as many steps as were averaged: a short run has fewer than LOSS_WINDOW, skipped (non-finite) steps none
        over = f"mean of the last {facts.loss_steps} logged steps" if facts.loss_steps != 1 else "the last logged step"
        rows.append((f"final loss ({over})", f"{facts.final_loss:.4f}"))
    return rows


def build_card(run_dir: str | Path, repo_id: str | None = None, dataset_size: int | None = None) -> ModelCard:
    """The card for a run folder; `repo_id` goes into the snippets (default: a placeholder to replace)."""
    _check_repo_id(repo_id)  # before the folder is read: a typo is reported as itself
    return card_for(gather(run_dir, dataset_size), repo_id)


def _check_repo_id(repo_id: str | None) -> None:
    if repo_id is not None:
        try:
            check_repo_id(repo_id)
        except RepoIdError as exc:
            raise CardError(f"--repo-id: {exc}") from None


def card_for(facts: RunFacts, repo_id: str | None = None) -> ModelCard:
    """The card for gathered run facts; `repo_id` goes into the snippets (default: a placeholder to replace)."""
    _check_repo_id(repo_id)
    out, prompts = facts.config.output, facts.config.sample.prompts
    words = ", ".join(f"`{w}`" for w in out.trigger_words)
    repo = repo_id or "USER/REPO"
    kohya = facts.kohya
    base = _base_reference(facts)
    files = [
        {"name": a.name, "format": a.metadata.get("sdlora.adapter_type", a.format) if a.format == "kohya" else a.format,
         "where": a.metadata.get("sdlora.loads_in") or ("diffusers, sdlora" if a.format == "diffusers"
                                                          else "ComfyUI, AUTOMATIC1111, Forge, kohya, sdlora")}
        for a in facts.adapters
    ]
    example = example_prompt(out.trigger_words, prompts[0] if prompts else "a photo")
    sample_caption = (
        f"Step {facts.samples[-1].rsplit('-', 1)[-1].removesuffix('.png').lstrip('0') or '0'}, seed "
        f"{facts.config.sample.seed}, {facts.config.sample.steps} steps, one column per prompt: "
        + "; ".join(f"*{p}*" for p in prompts)
        if facts.samples else ""
    )
    return ModelCard.from_template(
        card_data(facts),
        template_str=TEMPLATE,
        title=repo_id.split("/")[-1] if repo_id else out.name,
        base_text=f"`{facts.base_model}`" if facts.base_model else "a Stable Diffusion base",
        trigger_words=words, weight=f"{out.recommended_weight:g}", files=files, samples=facts.samples,
        sample_caption=sample_caption, pipeline_class=families.TABLE[facts.family].pipeline_class,
        base_note=base.note, base_import=base.python_import, base_python=base.python, base_cli=base.cli, repo=repo,
        primary=facts.primary.name, adapter_name=re.sub(r"\W", "_", out.name), example_prompt=example,
        kohya=kohya.name if kohya else None, kohya_stem=Path(kohya.name).stem if kohya else None,
        settings=_settings(facts), **_lycoris_note(facts, base.cli),
    )


# What diffusers does with each LyCORIS type's file, for the card's diffusers section.
LYCORIS_TYPES = {"dora": ("DoRA", "it drops the `dora_scale` magnitudes and would apply a different adapter"),
                 "loha": ("LoHa", "it refuses the `hada_` keys"), "lokr": ("LoKr", "it refuses the `lokr_` keys")}


def _lycoris_note(facts: RunFacts, base_cli: str) -> dict[str, str | None]:
    kind = facts.primary.metadata.get("sdlora.adapter_type")
    if kind not in LYCORIS_TYPES:
        return {"lycoris_type": None}
    name, why = LYCORIS_TYPES[kind]
    return {"lycoris_type": name, "lycoris_why": why, "convert_base": f" --base {base_cli}" if kind == "dora" else ""}


def example_prompt(trigger_words, prompt: str) -> str:
    """`prompt` with the trigger words it lacks put in front: a sample prompt that already holds one is kept as is."""
    missing = [w for w in trigger_words if w.lower() not in prompt.lower()]
    return ", ".join([*missing, prompt])


@dataclass(frozen=True)
class BaseReference:
    """How the card's snippets name the base: Python argument (and import), CLI value, and a note to the reader."""

    python: str
    cli: str
    note: str = ""
    python_import: str = ""


def _base_reference(facts: RunFacts) -> BaseReference:
    """A hub id as it is; a built-in base through sdlora, which ships it; a local base as a path the reader fills
    in, with a note saying so (its path stays on the trainer's machine)."""
    name = facts.base_name
    if facts.base_kind == "hub":
        return BaseReference(f'"{facts.base_model}"', facts.base_model)
    if facts.base_kind == "builtin":
        return BaseReference(
            f'str(resolve_builtin("{name}"))', name, python_import="from sdlora.models import resolve_builtin",
            note=f"The base is `{name}`, built into sdlora (`pip install sdlora`): sdlora commands take the name as "
                 "it is, and `resolve_builtin` gives diffusers its folder.")
    placeholder = f"PATH/TO/{name}"
    return BaseReference(
        f'"{placeholder}"', placeholder,
        note=f"**Replace `{placeholder}` below** with the base this adapter was trained on: `{name}`, a local folder "
             "or file on the trainer's machine, not a Hub model (the trainer can name its Hub id with "
             "`output.base_model_id`).")


def write_card(run_dir: str | Path, repo_id: str | None = None, dataset_size: int | None = None) -> Path:
    """Write README.md into the run folder (atomically) and return its path."""
    path = RunFolder(Path(run_dir)).card
    write_text_atomic(path, str(build_card(run_dir, repo_id, dataset_size)))
    return path
