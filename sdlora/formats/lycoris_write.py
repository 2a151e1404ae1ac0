"""Writing DoRA, LoHa and LoKr adapters (and any of them with LoCon convolutions) in the kohya/LyCORIS layout, the
one ComfyUI, AUTOMATIC1111/Forge, kohya sd-scripts and the LyCORIS package read.

Keys are `<kohya name>.<part>`, names from `formats.kohya.module_name` (`lora_unet_…`, `lora_te_…`,
`lora_te1_…`/`lora_te2_…`), parts as LyCORIS writes them (lycoris/modules/{locon,loha,lokr}.py):
- DoRA: `lora_down.weight`, `lora_up.weight`, `alpha`, `dora_scale`. peft's magnitude (`lora_magnitude_vector`,
  [out], or [1, out, 1, 1] on a convolution) is the norm of each OUTPUT row of W + ΔW; LyCORIS keeps the same vector as `dora_scale` of shape
  [out, 1] ([out, 1, 1, 1] for a convolution), its default `wd_on_out=True` orientation, which ComfyUI recognises by
  `dora_scale.shape[0] == out`. (AUTOMATIC1111 applies only the older input-axis orientation, [1, in].)
- LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in·k·k], `hada_w2_a`, `hada_w2_b`, `alpha`; ΔW = (w1a w1b) ⊙ (w2a w2b)
  · alpha / r in peft and LyCORIS alike (r read back from `hada_w1_b`).
- LoKr: `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, `alpha`; ΔW = w1 ⊗ w2 · scale.
  peft scales by alpha / r always; LyCORIS (and ComfyUI, A1111) read r off a decomposed factor and use scale 1 when
  both factors are full matrices. Such a module gets peft's alpha / r folded into `lokr_w1` and alpha = r, so every
  reader applies the update peft trained.

The header carries kohya's `ss_*` fields with `ss_network_module = lycoris.kohya` and `ss_network_args` (JSON of
LyCORIS's network args: `algo` and its options), and `sdlora.loads_in` naming the tools that apply the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sdlora import __version__
from sdlora.files.atomic import save_safetensors_atomic
from sdlora.formats import kohya
from sdlora.formats.adapter import AdapterFile, AdapterFormatError, check_target, save_diffusers
from sdlora.models.lora import AdapterShape, is_conv_target

LYCORIS_KINDS = ("dora", "loha", "lokr")
# peft's state-dict key of each adapter tensor: `<module>.<part>`.
PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hada_w[12]_[ab]"
                      r"|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$")
_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}


def modules_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft tensors grouped by module path: {module: {part: tensor}}; a key of no known part raises."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.match(key)
        if not match:
            raise AdapterFormatError(f"{key}: not a LoRA/DoRA/LoHa/LoKr tensor name peft writes")
        out.setdefault(match["module"], {})[match["part"]] = tensor
    return out


def trained_shape(tensors: dict[str, torch.Tensor], *, kind: str, rank: int, alpha: float, dropout: float = 0.0,
                  conv_rank: int | None = None, conv_alpha: float | None = None, factor: int = -1,
                  decompose_both: bool = False) -> AdapterShape:
    """The `AdapterShape` of a freshly trained adapter of any type: its modules read off the tensors, the ranks and
    alphas the run used (LoCon convolutions at conv_rank / conv_alpha, in rank_pattern / alpha_pattern)."""
    modules = sorted(modules_of(tensors))
    if not modules:
        raise AdapterFormatError("no adapter tensors found")
    convs = [m for m in modules if is_conv_target(m)] if conv_rank is not None else []
    return AdapterShape(
        rank=rank, alpha=float(alpha), target_modules=tuple(modules), dropout=dropout,
        rank_pattern={m: conv_rank for m in convs if conv_rank != rank},
        alpha_pattern={m: float(conv_alpha) for m in convs if conv_alpha != alpha},
        kind=kind, factor=factor, decompose_both=decompose_both,
    )


def _rank_alpha(shape: AdapterShape, module: str) -> tuple[int, float]:
    return int(shape.rank_pattern.get(module, shape.rank)), float(shape.alpha_pattern.get(module, shape.alpha))


def _module_tensors(kind: str, parts: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """One module's tensors in LyCORIS's part names (see the module docstring for each type's convention)."""
    out: dict[str, torch.Tensor] = {}
    if kind == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts:
        parts = {**parts, "lokr_w1": parts["lokr_w1"] * (alpha / rank)}
        alpha = float(rank)
    for part, tensor in parts.items():
        if part == "lora_magnitude_vector":
            # peft holds [out] for a Linear, [1, out, 1, 1] for a Conv2d; LyCORIS [out, 1] / [out, 1, 1, 1]
            down = parts["lora_A.weight"]
            tensor = tensor.reshape(-1, *[1] * (down.dim() - 1))
        out[_TO_KOHYA.get(part, part)] = tensor.contiguous()
    reference = next(iter(parts.values()))
    out["alpha"] = torch.tensor(alpha, dtype=reference.dtype)
    return out


def to_lycoris_state_dict(adapter: AdapterFile, family: str) -> dict[str, torch.Tensor]:
    """peft tensors per component -> kohya/LyCORIS keys. `family`: 'sdxl' names UNet modules the SGM way."""
    out: dict[str, torch.Tensor] = {}
    for component in adapter.components:
        shape = adapter.shapes[component]
        for module, parts in modules_of(adapter.tensors[component]).items():
            name = kohya.module_name(component, module, "sdxl" if family == "sdxl" else "sd")
            rank, alpha = _rank_alpha(shape, module)
            for part, tensor in _module_tensors(shape.kind, parts, rank, alpha).items():
                out[f"{name}.{part}"] = tensor
    return out


def network_args(shape: AdapterShape) -> dict[str, str]:
    """LyCORIS's `network_args` for this adapter, as kohya records them in `ss_network_args` (strings)."""
    from sdlora.formats.metadata import conv_network_args

    conv_args = conv_network_args(shape)
    algo = {"loha": "loha", "lokr": "lokr"}.get(shape.kind, "locon" if conv_args else "lora")
    args = {"algo": algo, **conv_args}
    if shape.kind == "dora":
        args.update(dora_wd="True", wd_on_output="True")
    if shape.kind == "lokr":
        args.update(factor=str(shape.factor), decompose_both=str(shape.decompose_both))
    if shape.dropout:
        args["dropout"] = str(shape.dropout)
    return args


def save_lycoris(path: str | Path, adapter: AdapterFile, title: str | None = None) -> Path:
    """Write a DoRA / LoHa / LoKr (or LoCon) adapter in the kohya/LyCORIS layout with its `ss_*` header. Atomic."""
    from sdlora.formats import metadata as meta

    path = check_target(path)
    family = meta.family_key(adapter.metadata, adapter.components)
    if family == "sd3":
        raise AdapterFormatError(f"{path}: SD3 adapters are written in diffusers layout only, which has no "
                                 "LyCORIS types")
    tensors = to_lycoris_state_dict(adapter, family)
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise AdapterFormatError(f"{path}: not written: {len(bad)} tensor(s) hold inf or NaN, e.g. {bad[0]}")
    main = adapter.shapes.get("unet") or next(iter(adapter.shapes.values()))
    header = meta.shareable({k: v for k, v in adapter.metadata.items()
                             if k.startswith(("sdlora.", "ss_", "modelspec."))})
    header.update(meta.kohya_header(adapter.metadata, main.rank, main.alpha, family, title or path.stem))
    header.update({
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps(network_args(main), sort_keys=True),
        "sdlora.adapter_type": main.kind,
        "sdlora.loads_in": meta.LOADS_IN[main.kind],
        "sdlora.version": __version__,
        "sshs_model_hash": meta.tensor_bytes_hash(tensors, {}),
    })
    save_safetensors_atomic(tensors, path, header)
    return path


def save_trained(path: str | Path, adapter: AdapterFile, title: str | None = None) -> Path:
    """A run's adapter in the layout its type is read in: plain LoRA and LoCon as the diffusers file
    `load_lora_weights` reads, DoRA / LoHa / LoKr in the kohya/LyCORIS layout (diffusers has none for them)."""
    kinds = {shape.kind for shape in adapter.shapes.values()}
    if kinds & set(LYCORIS_KINDS):
        return save_lycoris(path, adapter, title)
    from sdlora.formats.metadata import LOADS_IN

    adapter.metadata["sdlora.loads_in"] = LOADS_IN["diffusers"]
    return save_diffusers(path, adapter)
