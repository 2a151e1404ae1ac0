"""The one place that knows LoRA file formats, key names and metadata.

In memory an adapter is an `AdapterFile`: per component (`unet`, `text_encoder`, `text_encoder_2`) a peft-style
state dict (`<module>.lora_A.weight` [r, in], `<module>.lora_B.weight` [out, r]) and its `AdapterShape`
(rank, alpha, target modules). Files are read into that form whatever their format, and written from it.

diffusers / peft format (`pytorch_lora_weights.safetensors`): keys `<component>.<module>.lora_A.weight`; header
`format: pt` and `lora_adapter_metadata`, a JSON object of LoraConfig fields flattened with the component prefix
(`"unet.r"`, `"unet.lora_alpha"`, ...). Without that header diffusers assumes alpha = rank, so it is always written,
and kept minimal: the full peft `to_dict()` carries fields an older peft refuses.

kohya / AUTOMATIC1111 / ComfyUI keys live in `sdlora.formats.kohya` (SDXL's SGM UNet paths in `sdlora.formats.ldm`) and header
metadata in `sdlora.formats.metadata`; this module detects a file's layout, reads it, and writes either layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import __version__
from sdlora.errors import UserError
from sdlora.files.atomic import save_safetensors_atomic
from sdlora.files.untrusted import UnsafeFileError, sniff_pickle, validate_safetensors
from sdlora.models.lora import AdapterShape

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # transformer: SD3's denoiser
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# diffusers' older key style, still found in files on the Hub.
_LEGACY_KEY = re.compile(r"^(?P<module>.+)\.lora(?:_linear_layer)?\.(?P<part>up|down)\.weight$")


class AdapterFormatError(UserError, ValueError):
    """A LoRA file that sdlora cannot read; the message lists what did not match."""


@dataclass
class AdapterFile:
    tensors: dict[str, dict[str, torch.Tensor]]
    shapes: dict[str, AdapterShape]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"

    @property
    def components(self) -> list[str]:
        return [c for c in COMPONENTS if self.tensors.get(c)]


def shape_from_tensors(tensors: dict[str, torch.Tensor], alpha: float | None = None) -> AdapterShape:
    """Rank and exact target modules read off the tensors; per-module ranks go to peft's rank_pattern."""
    ranks: dict[str, int] = {}
    for key, value in tensors.items():
        match = _PEFT_KEY.match(key)
        if match and match["part"] == "A":
            ranks[match["module"]] = int(value.shape[0])
    if not ranks:
        raise AdapterFormatError("no lora_A tensors found")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    rank_pattern = {module: r for module, r in ranks.items() if r != rank}
    return AdapterShape(rank=rank, alpha=float(alpha if alpha is not None else rank),
                        target_modules=tuple(sorted(ranks)), rank_pattern=rank_pattern)


# ---------------------------------------------------------------------------------------------------------------
# diffusers / peft


def _adapter_metadata(shapes: dict[str, AdapterShape]) -> str:
    flat: dict[str, object] = {}
    for component, shape in shapes.items():
        fields = {
            "r": shape.rank,
            "lora_alpha": shape.alpha,
            "target_modules": list(shape.target_modules),
            "rank_pattern": dict(shape.rank_pattern),
            "alpha_pattern": dict(shape.alpha_pattern),
            "use_dora": False,
            "lora_bias": False,
        }
        flat.update({f"{component}.{name}": value for name, value in fields.items()})
    return json.dumps(flat, sort_keys=True)


def to_diffusers_state_dict(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    return {
        f"{component}.{key}": tensor for component in adapter.components for key, tensor in adapter.tensors[component].items()
    }


def fold_alpha(adapter: AdapterFile) -> AdapterFile:
    """The same adapter with each module's alpha / r folded into its lora_B, so alpha = r everywhere.

    For SD3 the diffusers file is also the one ComfyUI loads (its key map reads `transformer.` keys), and ComfyUI
    takes alpha only from per-module `.alpha` tensors, which diffusers' loader does not accept: with alpha = r
    both read the header-less scale 1 and apply the same update."""
    tensors, shapes = {}, {}
    for component in adapter.components:
        shape = adapter.shapes[component]
        folded = dict(adapter.tensors[component])
        ranks: dict[str, int] = {}
        for key, value in adapter.tensors[component].items():
            match = _PEFT_KEY.match(key)
            if match and match["part"] == "A":
                ranks[match["module"]] = int(value.shape[0])
        for module, rank in ranks.items():
            alpha = next((a for name, a in shape.alpha_pattern.items() if module.endswith(name)), shape.alpha)
            key = f"{module}.lora_B.weight"
            folded[key] = folded[key] * (float(alpha) / rank)
        tensors[component] = folded
        shapes[component] = AdapterShape(shape.rank, float(shape.rank), shape.target_modules, shape.dropout,
                                         dict(shape.rank_pattern), dict(shape.rank_pattern))
    return AdapterFile(tensors, shapes, dict(adapter.metadata), adapter.format)


def save_diffusers(path: str | Path, adapter: AdapterFile, dtype: torch.dtype | None = None) -> Path:
    """Write the diffusers/peft file that `pipe.load_lora_weights` loads as is (an SD3 one also in ComfyUI: its
    alpha is folded into the weights, see `fold_alpha`). Atomic."""
    from sdlora.formats.metadata import shareable

    if "transformer" in adapter.components:
        adapter = fold_alpha(adapter)
    tensors = to_diffusers_state_dict(adapter)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    _refuse_non_finite(Path(path), tensors, dtype)
    metadata = shareable({str(k): str(v) for k, v in adapter.metadata.items()})
    metadata.update(
        {
            "format": "pt",
            "lora_adapter_metadata": _adapter_metadata({c: adapter.shapes[c] for c in adapter.components}),
            "sdlora.version": __version__,
        }
    )
    save_safetensors_atomic(tensors, path, metadata)
    return Path(path)


def _parse_adapter_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"lora_adapter_metadata is not valid JSON: {exc}") from None
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        per_component.setdefault(component, {})[name] = value
    return per_component


def from_diffusers_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
    """Split prefixed keys by component; alpha from the header, else alpha = rank (diffusers' rule)."""
    per_component: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        legacy = _LEGACY_KEY.match(rest)
        if legacy:
            rest = f"{legacy['module']}.lora_{'A' if legacy['part'] == 'down' else 'B'}.weight"
        if component not in COMPONENTS or not _PEFT_KEY.match(rest):
            unmatched.append(key)
            continue
        if component == "text_encoder":
            # transformers 5 names CLIPTextModel modules without `text_model.`; older files carry it.
            rest = rest.removeprefix("text_model.")
        per_component.setdefault(component, {})[rest] = value
    if unmatched:
        raise AdapterFormatError(_unmatched_message(unmatched))
    configs = _parse_adapter_metadata(metadata)
    shapes = {}
    for component, component_tensors in per_component.items():
        config = configs.get(component, {})
        shape = shape_from_tensors(component_tensors, config.get("lora_alpha"))
        if config.get("alpha_pattern"):
            shape = AdapterShape(**{**shape.__dict__, "alpha_pattern": dict(config["alpha_pattern"])})
        shapes[component] = shape
    return AdapterFile(tensors=per_component, shapes=shapes, metadata=dict(metadata), format="diffusers")


# ---------------------------------------------------------------------------------------------------------------
# Reading any file


def _open_checks(path: Path) -> None:
    """What a path must be before its header is read: an existing, non-empty .safetensors file, not a folder and
    not a pickle (the header checks in `files.untrusted` say whether it is whole and honest)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
        hint = (f"pass the adapter file inside it: {path / inside[0]}" if len(inside) == 1
                else f"it holds {len(inside)} .safetensors files ({', '.join(inside[:5])}): pass one of them"
                if inside else "it holds no .safetensors file: pass the adapter file itself")
        raise AdapterFormatError(f"{path} is a folder, not an adapter file; {hint}")
    if not path.is_file():
        raise AdapterFormatError(f"{path}: adapter file not found")
    sniff_pickle(path)
    if path.suffix != ".safetensors":
        raise AdapterFormatError(f"{path}: sdlora reads adapters only from .safetensors files")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _open_checks(path)
    try:
        validate_safetensors(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except UnsafeFileError as exc:
        raise AdapterFormatError(str(exc)) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {exc}") from None
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's header metadata (`sdlora.base_model`, `ss_*`, ...), its tensors left unread."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _open_checks(path)
    try:
        validate_safetensors(path)
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except UnsafeFileError as exc:
        raise AdapterFormatError(str(exc)) from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {exc}") from None


def _unmatched_message(unmatched: list[str]) -> str:
    shown = sorted(unmatched)[:20]
    more = f" (and {len(unmatched) - len(shown)} more)" if len(unmatched) > len(shown) else ""
    return (
        f"{len(unmatched)} key(s) match no known LoRA layout (diffusers/peft `unet.<module>.lora_A.weight`, or "
        f"kohya `lora_unet_<module>.lora_down.weight`): " + ", ".join(shown) + more
        + ". Nothing was loaded"
    )


def detect_format(keys) -> str:
    """'kohya' or 'diffusers' from the key names; an unknown layout raises, listing the keys."""
    from sdlora.formats import kohya

    keys = list(keys)
    if not keys:
        raise AdapterFormatError("the file holds no tensors")
    if kohya.is_kohya(keys):
        return "kohya"
    if any(key.partition(".")[0] in COMPONENTS for key in keys):
        return "diffusers"
    raise AdapterFormatError(_unmatched_message(keys))


def from_kohya_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> AdapterFile:
    from sdlora.formats import kohya

    per_component, shapes, unmatched = kohya.from_kohya_state_dict(tensors)
    if unmatched:
        raise AdapterFormatError(_unmatched_message(unmatched))
    return AdapterFile(tensors=per_component, shapes=shapes, metadata=dict(metadata), format="kohya")


def read_adapter(path: str | Path) -> AdapterFile:
    """Read an adapter file in any supported layout (LyCORIS types: a `lycoris.LycorisFile`); unknown keys are refused."""
    from sdlora.formats import lycoris
    from sdlora.formats.validate import check_read
    tensors, metadata = read_safetensors(path)
    if lycoris.is_lycoris(tensors, metadata):  # LoHa/LoKr/DoRA/Tucker parts: read per layer, not into peft's form
        return lycoris.from_state_dict(path, tensors, metadata)
    try:
        if detect_format(tensors) == "kohya":
            adapter = from_kohya_state_dict(tensors, metadata)
        else:
            adapter = from_diffusers_state_dict(tensors, metadata)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    check_read(path, adapter)  # finite, A and B paired and of one rank: every command reads through here
    return adapter


# kohya / AUTOMATIC1111 / ComfyUI


def save_kohya(path: str | Path, adapter: AdapterFile, dtype: torch.dtype | None = None,
               title: str | None = None) -> Path:
    """Write the file A1111, Forge, ComfyUI and sd-scripts load: kohya keys, `ss_*` + `modelspec.*` header. Atomic."""
    from sdlora.formats import kohya
    from sdlora.formats import metadata as meta
    from sdlora.formats.ldm import LayoutError

    family = meta.family_key(adapter.metadata, adapter.components)
    if family == "sd3":
        # ComfyUI's LoRA key map reads SD3 adapters by their diffusers `transformer.` names, as diffusers does, so
        # the diffusers file is already the one both load; no kohya layout of SD3 is written.
        raise AdapterFormatError(f"{path}: SD3 adapters are written in diffusers layout only (ComfyUI and diffusers "
                                 "both load its `transformer.` keys as they are); use --to diffusers "
                                 "(in a run, output.kohya=false)")
    shapes = {c: adapter.shapes[c] for c in adapter.components}
    try:
        tensors = kohya.to_kohya_state_dict({c: adapter.tensors[c] for c in adapter.components}, shapes,
                                            "sdxl" if family == "sdxl" else "sd")
    except LayoutError as exc:
        raise LayoutError(f"{path}: cannot write this {family} adapter in kohya layout: {exc}; "
                          "keep it in diffusers layout (--to diffusers; in a run, output.kohya=false)") from None
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    _refuse_non_finite(Path(path), tensors, dtype)
    main = shapes.get("unet") or next(iter(shapes.values()))
    header = meta.shareable({k: v for k, v in adapter.metadata.items()
                             if k.startswith(("sdlora.", "ss_", "modelspec."))})
    header.update(meta.kohya_header(adapter.metadata, main.rank, main.alpha, family, title or Path(path).stem))
    header["sdlora.version"] = __version__
    header["sshs_model_hash"] = meta.tensor_bytes_hash(tensors, {})
    save_safetensors_atomic(tensors, path, header)
    return Path(path)


def check_target(path: str | Path, option: str = "output") -> Path:
    """Where an adapter may be written: a `.safetensors` file name that is not a folder. Checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFormatError(f"{option} {path} is a folder; give a file name, e.g. {path / 'adapter.safetensors'}")
    if path.suffix != ".safetensors":
        raise AdapterFormatError(
            f"{option} {path}: adapters are written only as .safetensors (sdlora, A1111 and ComfyUI read a "
            f"{path.suffix or 'suffix-less'} file as a pickle, or not at all); name it {path.stem}.safetensors")
    return path


def _refuse_non_finite(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Never write a NaN/inf tensor (reading refuses them; fp16 overflows above 65504), nor an empty adapter."""
    if not tensors:  # e.g. a LoHa/LoKr/DoRA file read by formats.lycoris: it has no lora_A/lora_B pairs to write
        raise AdapterFormatError(f"{path}: not written: the adapter holds no plain LoRA (lora_A/lora_B) layers")
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        why = f" after the cast to {str(dtype).removeprefix('torch.')} (values beyond its range)" if dtype else ""
        raise AdapterFormatError(f"{path}: not written: {len(bad)} tensor(s) would hold inf or NaN{why}, e.g. "
                                 f"{bad[0]}; keep the input's dtype or use --dtype bf16 / fp32")


def save_adapter(path: str | Path, adapter: AdapterFile, to: str = "diffusers", dtype: torch.dtype | None = None) -> Path:
    check_target(path)
    if to == "kohya":
        return save_kohya(path, adapter, dtype)
    if to == "diffusers":
        return save_diffusers(path, adapter, dtype)
    raise AdapterFormatError(f"--to: unknown format {to!r}; choose kohya or diffusers")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def convert(source: str | Path, target: str | Path, to: str, dtype: str | None = None) -> Path:
    """Read any supported file and write it in `to` layout, optionally cast to fp16 / bf16 / fp32."""
    if dtype is not None and dtype not in DTYPES:
        raise AdapterFormatError(f"--dtype: unknown {dtype!r}; choose fp16, bf16 or fp32")
    check_target(target, "convert: output")
    adapter = read_adapter(source)
    return save_adapter(target, adapter, to, DTYPES[dtype] if dtype else None)


INFO_VALUE_CHARS = 300  # a metadata value longer than this is cut in `sdlora info` (kohya's tag counts run to MBs)


def describe(path: str | Path, full: bool = False) -> dict:
    """What `sdlora info` prints: layout, the family it was made for (and why sdlora thinks so), components with
    rank / alpha / module count, and the header summary, each value cut at INFO_VALUE_CHARS unless `full`."""
    from sdlora.formats import metadata as meta
    from sdlora.formats.validate import adapter_family

    adapter = read_adapter(path)
    components = {
        c: {"rank": s.rank, "alpha": s.alpha, "modules": len(s.target_modules),
            "dtype": str(next(iter(adapter.tensors[c].values())).dtype).removeprefix("torch.")}
        for c, s in adapter.shapes.items()
    }
    found = adapter_family(adapter)
    family = {"name": found[0], "from": found[1]} if found else {"name": "unknown", "from": "no header field or "
                                                                                          "key layout says"}
    summary = meta.summary(adapter.metadata)
    if not full:
        summary = {k: _cut(v) for k, v in summary.items()}
    return {"file": str(path), "format": adapter.format, "family": family, "components": components,
            "metadata": summary}


def _cut(value: str) -> str:
    if len(value) <= INFO_VALUE_CHARS:
        return value
    return (f"{value[:INFO_VALUE_CHARS]}... [{len(value) - INFO_VALUE_CHARS} more characters cut; "
            "sdlora info --full shows all]")
