"""Header metadata of LoRA files, part of the format layer: kohya `ss_*`, Stability `modelspec.*`, sdlora provenance.

All values are strings (safetensors headers hold only strings). The kohya minimum (`ss_network_module`,
`ss_network_dim`, `ss_network_alpha`, `ss_v2`, `ss_base_model_version`) is what A1111 / Forge / ComfyUI and the
sd-scripts tools read; A1111 hides an SDXL LoRA in SDXL sessions unless `ss_base_model_version` starts with
`sdxl_`. `sshs_model_hash` is the SHA-256 of the tensor bytes after the header (what kohya and A1111 compare).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time

import torch

from sdlora.config.names import public_name
from sdlora.models import families

# `sdlora.loads_in`: the tools that apply a file, by its layout (plain LoRA / LoCon) or adapter type.
LOADS_IN = {
    "diffusers": "diffusers (load_lora_weights), ComfyUI, sdlora; the kohya copy (output.kohya) for "
                 "AUTOMATIC1111/Forge, kohya sd-scripts and LyCORIS",
    "kohya": "AUTOMATIC1111/Forge, ComfyUI, kohya sd-scripts, LyCORIS, diffusers (load_lora_weights), sdlora",
    "dora": "LyCORIS, ComfyUI, sdlora (dora_scale on the output axis: AUTOMATIC1111 applies only input-axis DoRA, "
            "diffusers drops dora_scale)",
    "loha": "LyCORIS, ComfyUI, AUTOMATIC1111/Forge, sdlora (not diffusers: `sdlora convert --to lora` makes one)",
    "lokr": "LyCORIS, ComfyUI, AUTOMATIC1111/Forge, sdlora (not diffusers: `sdlora convert --to lora` makes one)",
}


def family_key(metadata: dict[str, str], components: list[str]) -> str:
    """A name in `families.TABLE` from sdlora's provenance, kohya's or modelspec's header, else from the parts."""
    family = metadata.get("sdlora.family")
    if family is None:
        version = metadata.get("ss_base_model_version", "")
        architecture = metadata.get("modelspec.architecture", "")
        if version == "sd3" or architecture.startswith("stable-diffusion-3") or "transformer" in components:
            family = "sd3"
        elif version.startswith("sdxl") or "-xl-" in architecture or "text_encoder_2" in components:
            family = "sdxl"
        elif version.startswith("sd_v2") or "-v2-" in architecture:
            family = "sd2"
        else:
            family = "sd1"
    v_pred = metadata.get("sdlora.prediction_type") == "v_prediction" or metadata.get("ss_v_parameterization") == "True"
    return "sd2-v" if family == "sd2" and v_pred else family


def _training_field(metadata: dict[str, str], *path: str):
    try:
        node = json.loads(metadata.get("sdlora.training_config", "{}"))
        for part in path:
            node = node[part]
        return node
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def shareable(metadata: dict[str, str]) -> dict[str, str]:
    """A header fit to share: `sdlora.base_model` as a hub id or built-in name, a local base by its final name only.

    Every adapter writer applies it, so converting or merging a file an older sdlora wrote (which kept the full
    path) does not pass the path on. New files already hold the public name; applying it again changes nothing."""
    out = dict(metadata)
    if "sdlora.base_model" in out:
        out["sdlora.base_model"] = public_name(out["sdlora.base_model"])
    return out


def kohya_header(metadata: dict[str, str], rank: int, alpha: float, family: str, title: str) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` keys for a kohya-format file, from an adapter's sdlora provenance."""
    row = families.TABLE[family]
    resolution = _training_field(metadata, "data", "resolution") or row.resolution
    trigger = metadata.get("sdlora.trigger_words", "")
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        # kohya names the family's own target: a file's header cannot say more than its base
        **families.adapter_metadata(family, row.prediction_type, resolution),
        "ss_v_parameterization": str(row.prediction_type == "v_prediction"),
        "ss_output_name": title,
        "ss_resolution": str((resolution, resolution)),
        # kohya writes the base's hub id, or a local file's name only (never its path): so does sdlora.
        "ss_sd_model_name": public_name(metadata.get("sdlora.base_model", "")),
        # SDXL UNet keys are written in SGM layout (`formats.ldm`), Stability's own implementation
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": title,
        "modelspec.date": metadata.get("modelspec.date") or time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if trigger:
        header["modelspec.trigger_phrase"] = trigger
    for source, target in (("train", "learning_rate"), ("train", "steps"), ("train", "seed")):
        value = _training_field(metadata, source, target)
        if value is not None:
            header[{"learning_rate": "ss_learning_rate", "steps": "ss_max_train_steps", "seed": "ss_seed"}[target]] = str(value)
    if "ss_tag_frequency" in metadata:
        header["ss_tag_frequency"] = metadata["ss_tag_frequency"]
    return header


def conv_network_args(shape) -> dict[str, str]:
    """kohya's `conv_dim` / `conv_alpha` network args (strings, as kohya stores them) of an adapter with LoCon
    convolutions (`models.lora.is_conv_target`); empty without."""
    from sdlora.models.lora import is_conv_target

    convs = [m for m in shape.target_modules if is_conv_target(m)]
    if not convs:
        return {}
    return {"conv_dim": str(shape.rank_pattern.get(convs[0], shape.rank)),
            "conv_alpha": str(float(shape.alpha_pattern.get(convs[0], shape.alpha)))}


def kohya_extras(shape) -> dict[str, str]:
    """Header fields of a kohya-layout plain LoRA / LoCon file beyond `kohya_header`: the tools that load it and,
    with LoCon convolutions, kohya's network args."""
    extras = {"sdlora.loads_in": LOADS_IN["kohya"]}
    conv_args = conv_network_args(shape)
    if conv_args:
        extras["ss_network_args"] = json.dumps(conv_args, sort_keys=True)
    return extras


def tag_frequency(captions: list[str], folder_name: str) -> str:
    """kohya's `ss_tag_frequency`: JSON `{folder: {tag: count}}`, tags being the comma-separated caption parts."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps({folder_name: counts}, sort_keys=True)


def tensor_bytes_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of the bytes after the safetensors header, as kohya computes `sshs_model_hash`.

    The header (which would hold this hash) is excluded, so the hash is stable when metadata changes."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    header_size = struct.unpack("<Q", blob[:8])[0]
    return hashlib.sha256(blob[8 + header_size:]).hexdigest()


def summary(metadata: dict[str, str]) -> dict[str, str]:
    """The header keys a person wants to read (`sdlora info`), training config excluded (it is long)."""
    keep = [k for k in metadata if k.startswith(("ss_", "modelspec.", "sdlora.", "sshs_"))]
    return {k: metadata[k] for k in sorted(keep) if k != "sdlora.training_config"}


def _file_sha256(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def base_model_hash(source: str) -> str | None:
    """SHA-256 over a local base's UNet and text-encoder weight files (a single file: the file itself).

    None for hub ids: their revision names them. Weights, not configs, decide what an adapter was trained on."""
    from pathlib import Path

    path = Path(source)
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    files = sorted(p for sub in ("unet", "text_encoder") for p in (path / sub).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}:{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def dataset_hash(records) -> str:
    """SHA-256 over every training image's bytes and its caption, in a fixed order (renaming a folder keeps it)."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: (str(r.path.name), r.caption)):
        digest.update(_file_sha256(record.path).encode())
        digest.update(record.caption.encode("utf-8") + b"\n")
    return digest.hexdigest()


def provenance(*, base_source: str, records, trigger_words, recommended_weight: float, folder_name: str) -> dict[str, str]:
    """sdlora's provenance keys plus kohya's tag frequency, for the header of every adapter a run writes."""
    out = {
        "sdlora.dataset_hash": dataset_hash(records),
        "sdlora.trigger_words": ", ".join(trigger_words),
        "sdlora.recommended_weight": str(float(recommended_weight)),
        "ss_tag_frequency": tag_frequency([r.caption for r in records], folder_name),
    }
    base_hash = base_model_hash(base_source)
    if base_hash:
        out["sdlora.base_model_hash"] = base_hash
    return out
