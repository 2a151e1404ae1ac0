"""AUTOMATIC1111's `<lora:name:w>` prompt tags: parsed out of a prompt, and each name resolved to a file inside the
`--lora-dir` folder (never outside it: `..`, absolute names and links that leave the folder are refused)."""

from __future__ import annotations

import re
from pathlib import Path

from sdlora import formats
from sdlora.inference.pipeline import AdapterSpec


class LoraNameError(formats.AdapterFormatError):
    """A `<lora:name:w>` in a prompt that names no adapter in the LoRA folder (or tries to leave it)."""


_PROMPT_LORA = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float, float]]]:
    """AUTOMATIC1111's `<lora:name:w>` / `<lora:name:te_w:unet_w>` (also `te=`, `unet=`): the prompt without the
    tags, and (name, unet_weight, text_encoder_weight) per tag. One number sets both; text encoder comes first."""
    found = []
    for match in _PROMPT_LORA.finditer(prompt):
        name, rest = match[1].strip(), [a.strip() for a in match[2].split(":")[1:] if a.strip()]
        named = dict(a.split("=", 1) for a in rest if "=" in a)
        positional = [a for a in rest if "=" not in a]
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise LoraNameError(f"prompt: {match[0]!r}: weights must be numbers, e.g. <lora:{name}:0.7>") from None
        found.append((name, unet, te))
    cleaned = re.sub(r"\s{2,}", " ", _PROMPT_LORA.sub("", prompt)).strip().strip(",").strip()
    return cleaned, found


def resolve_in_folder(name: str, folder: str | Path) -> Path:
    """The `.safetensors` file in `folder` (searched recursively) whose stem, or path without suffix, is `name`.

    Only files found by listing `folder` are candidates, and each must resolve inside it: a name like
    `../../etc/passwd` is refused before anything is read."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise LoraNameError(f"--lora-dir: {folder} is not a folder")
    if Path(name).is_absolute() or ".." in re.split(r"[\\/]", name) or "\0" in name:
        raise LoraNameError(f"<lora:{name}>: refused, adapter names must stay inside --lora-dir {folder}")
    wanted = name.removesuffix(".safetensors")
    found = sorted(root.rglob("*.safetensors"))
    candidates = [p for p in found if p.resolve().is_relative_to(root)]
    matches = [p for p in candidates if p.relative_to(root).with_suffix("").as_posix() == wanted]
    matches = matches or [p for p in candidates if p.stem == wanted]
    leaving = [p for p in found if p not in candidates and wanted in (p.relative_to(root).with_suffix("").as_posix(),
                                                                      p.stem)]
    if leaving and not matches:
        raise LoraNameError(f"<lora:{name}>: refused: {leaving[0]} is a link to {leaving[0].resolve()}, which leaves "
                            f"--lora-dir {folder}; copy the file into the folder to use it")
    if not matches:
        known = ", ".join(p.relative_to(root).with_suffix("").as_posix() for p in candidates[:20]) or "none"
        raise LoraNameError(f"<lora:{name}>: no {wanted}.safetensors in {folder} (found: {known})")
    if len(matches) > 1:
        raise LoraNameError(f"<lora:{name}>: several files match in {folder}: {[str(p) for p in matches]}; "
                            "use the sub-folder path, e.g. <lora:sub/name:1>")
    return matches[0]


def prompt_specs(prompt: str, lora_dir: str | Path | None) -> tuple[str, list[AdapterSpec]]:
    """Adapters named in the prompt, as specs on files in `lora_dir`, and the prompt without the tags."""
    cleaned, tags = parse_prompt_loras(prompt)
    if tags and lora_dir is None:
        raise LoraNameError(f"prompt names adapters ({', '.join(t[0] for t in tags)}): pass --lora-dir FOLDER")
    return cleaned, [AdapterSpec(str(resolve_in_folder(n, lora_dir)), unet, te) for n, unet, te in tags]
