"""What a base says about itself without loading its weights: its tokenizer (so `sdlora dataset check` counts caption
tokens as training will cut them) and the resolution it was trained at.

Offline by design: a built-in name resolves to its folder (the tiny ones are built locally on first use), a hub id
is read only from the local Hugging Face cache and never downloaded, and a single file answers through
`model.single_file_config` (or, for the resolution, its family). When nothing local answers, the callers fall back
to the preflight's approximate counter and the configured resolution, and say so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sdlora.config import ModelSection, RunConfig
from sdlora.data import preflight
from sdlora.data.preflight import TokenCounter
from sdlora.models import families
from sdlora.models.base import SINGLE_FILE_SUFFIXES, ModelLoadError, resolve_builtin, single_file_family

log = logging.getLogger(__name__)

TRAINING_RECORD = "training.json"  # what scripts/train_base.py writes beside a base it trained (its `size` arg)


@dataclass(frozen=True)
class NativeResolution:
    """The side a base was trained at, and where that was read (said to the user beside the number)."""

    side: int
    why: str


def local_folder(source: str | None, revision: str | None = None) -> Path | None:
    """The local diffusers folder of a built-in name, a folder or a hub id already in the cache; None otherwise
    (a single file, an unknown name, a hub id never downloaded). Never touches the network."""
    if not source:
        return None
    if source.startswith("sdlora:"):
        try:
            return resolve_builtin(source)
        except ModelLoadError:
            return None
    if Path(source).is_dir():
        return Path(source)
    if Path(source).is_file() or source.endswith(SINGLE_FILE_SUFFIXES):
        return None
    from huggingface_hub import snapshot_download

    try:  # local_files_only: the snapshot folder if this revision is cached (possibly only some of its files)
        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: both mean "nothing local to read"
        return None


def _describing_folder(model: ModelSection) -> Path | None:
    """The folder whose tokenizer and configs describe `model.base`: the base itself, or a single file's
    `model.single_file_config`."""
    base = model.base
    if Path(base).is_file() or base.endswith(SINGLE_FILE_SUFFIXES):
        return local_folder(model.single_file_config)
    return local_folder(base, model.revision)


def caption_token_counter(model: ModelSection) -> TokenCounter | None:
    """Exact token counts and limit from the base's own (first) tokenizer, as training tokenizes; None when no
    local tokenizer describes the base (the preflight then estimates against CLIP's 77)."""
    folder = _describing_folder(model)
    if folder is None or not (folder / "tokenizer").is_dir():
        return None
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError) as exc:
        log.warning("cannot read the tokenizer in %s (%s); caption lengths are estimated", folder, exc)
        return None
    specials = tokenizer.num_special_tokens_to_add()

    def count(text: str) -> int:
        # tokenize() rather than __call__: the latter warns about every over-long caption, which the report
        # already names file by file.
        return len(tokenizer.tokenize(text)) + specials

    def cut_off(text: str) -> str:
        """The words training's truncation to model_max_length drops, whole: a word cut in the middle counts as
        lost (CLIP's BPE ends each word's last piece with `</w>`)."""
        pieces = tokenizer.tokenize(text)
        start = tokenizer.model_max_length - specials
        while 0 < start < len(pieces) and not pieces[start - 1].endswith("</w>"):
            start -= 1
        return tokenizer.decode(tokenizer.convert_tokens_to_ids(pieces[start:])).strip()

    return TokenCounter(count, tokenizer.model_max_length, "tokenizer", cut_off)


def check_dataset(config: RunConfig, bare_folder: bool) -> preflight.PreflightReport:
    """`sdlora dataset check`: the preflight with the base's own tokenizer (the truncation training will do). A bare
    folder, whose `data.resolution` nobody set, is checked at the base's native resolution; a config file at what
    its training will use, with a hint when the base was trained at another size."""
    data = config.data
    note = "data.resolution" if "resolution" in data.model_fields_set else "the default"
    native = None if "resolution" in data.model_fields_set else native_resolution(config.model)
    if native is not None and bare_folder:
        data = data.model_copy(update={"resolution": native.side})
        note = f"data.resolution not set: {native.why}"
    elif native is not None and native.side != data.resolution:
        note = f"the default; {native.why}: set data.resolution={native.side}"
    return preflight.check(data, config.train.batch_size, config.train.gradient_accumulation,
                           tokens=caption_token_counter(config.model), resolution_note=note)


def native_resolution(model: ModelSection) -> NativeResolution | None:
    """The side the base was trained at: a training record beside it (the shipped bases), else the UNet's latent
    `sample_size` times the VAE's downsampling factor, else (a single file) its family's. None when unknown."""
    folder = _describing_folder(model)
    if folder is not None:
        found = _from_training_record(folder) or _from_configs(folder)
        if found is not None:
            side, where = found
            return NativeResolution(side, f"{model.base} was trained at {side} px, per {where}")
    family = model.family or _single_file_family(model.base)
    if family is not None:
        side = families.TABLE[family].resolution
        return NativeResolution(side, f"{model.base} is an {family} base, trained at {side} px")
    return None


def _from_training_record(folder: Path) -> tuple[int, str] | None:
    try:
        size = json.loads((folder / TRAINING_RECORD).read_text(encoding="utf-8"))["args"]["size"]
        return int(size), f"its {TRAINING_RECORD}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _from_configs(folder: Path) -> tuple[int, str] | None:
    try:
        denoiser = "unet" if (folder / "unet").is_dir() else "transformer"  # SD3's denoiser is a transformer
        latent_side = json.loads((folder / denoiser / "config.json").read_text(encoding="utf-8"))["sample_size"]
        vae_blocks = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(latent_side, (list, tuple)):  # some UNets give (height, width)
        latent_side = latent_side[0]
    factor = 2 ** (len(vae_blocks) - 1)  # every VAE encoder block but the last halves the image
    return int(latent_side) * factor, f"its {denoiser} sample_size {latent_side} x VAE downsampling {factor}"


def _single_file_family(base: str) -> str | None:
    if not (Path(base).is_file() and base.endswith(".safetensors")):
        return None
    try:
        return single_file_family(Path(base))
    except Exception:  # an unreadable file is reported by the run that loads it, not here
        return None
