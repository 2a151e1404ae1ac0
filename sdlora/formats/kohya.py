"""kohya / AUTOMATIC1111 / Forge / ComfyUI LoRA keys: the names `formats.adapter` reads and writes kohya files with.

Key = `<prefix>_<module path, dots replaced by _>` + `.lora_down.weight` (peft lora_A), `.lora_up.weight`
(lora_B) or `.alpha` (0-dim). Loaders split at the first dot, so the name part never holds one. The update is
`W += w * (alpha / r) * up @ down`; a module without alpha has alpha = r.

Prefixes: `lora_unet_`; `lora_te_` for the one text encoder of SD1/SD2 (`lora_te1_` loads in A1111/ComfyUI/diffusers
but not in sd-scripts); `lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP-G) for SDXL. Text-encoder names always carry
`text_model_`: under transformers 5 `CLIPTextModel` paths lack `text_model.` (added on write, removed on read) while
`CLIPTextModelWithProjection` keeps it. SDXL UNet names are written in SGM layout (`input_blocks_4_1_...`), as
sd-scripts writes them; both layouts are read. diffusers' own `convert_state_dict_to_kohya` is not used: it writes
alpha = rank and drops `text_model_`.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from sdlora.formats import ldm
from sdlora.models.lora import AdapterShape

PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_KEY = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")

# Module-name words that themselves contain underscores, longest first: splitting a kohya name at every `_` and
# gluing these back gives the dotted module path (`to_out_0` -> `to_out.0`).
_COMPOUNDS = sorted(
    {
        "conv_norm_out", "time_emb_proj", "final_layer_norm", "down_blocks", "up_blocks", "mid_block",
        "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "conv_in", "conv_out",
        "conv_shortcut", "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn",
        "q_proj", "k_proj", "v_proj", "out_proj", "input_blocks", "middle_block", "output_blocks", "in_layers",
        "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb", "text_projection",
        "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "norm_out", "conv_act",
    },
    key=lambda word: -word.count("_"),
)


def _dotted(body: str) -> str:
    words = body.split("_")
    out, i = [], 0
    while i < len(words):
        for compound in _COMPOUNDS:
            size = compound.count("_") + 1
            if "_".join(words[i:i + size]) == compound:
                out.append(compound)
                i += size
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def module_name(component: str, path: str, family: str) -> str:
    """kohya name of a module: `unet`, `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_...`."""
    if component == "unet":
        prefix = "lora_unet_"
        if family == "sdxl":
            path = ldm.to_sgm(path, up_attention_blocks=frozenset({0, 1}))
    elif component == "text_encoder":
        prefix = "lora_te1_" if family == "sdxl" else "lora_te_"
        path = path if path.startswith("text_model.") else f"text_model.{path}"
    elif component == "text_encoder_2":
        prefix = "lora_te2_"  # CLIPTextModelWithProjection paths already hold `text_model.` (or `text_projection`)
    else:
        raise ValueError(f"no kohya prefix for component {component!r}")
    return prefix + path.replace(".", "_")


def parse_module_name(name: str) -> tuple[str, str]:
    """Inverse of `module_name`: (component, module path as peft names it on the diffusers/transformers model)."""
    for prefix, component in sorted(PREFIXES.items(), key=lambda item: -len(item[0])):
        if name.startswith(prefix):
            path = _dotted(name[len(prefix):])
            break
    else:
        raise ValueError(f"{name}: no kohya prefix")
    if component == "unet":
        return component, ldm.from_sgm(path)
    if component == "text_encoder":
        return component, path.removeprefix("text_model.")
    return component, path


def is_kohya(keys) -> bool:
    return any(key.startswith(tuple(PREFIXES)) for key in keys)


def to_kohya_state_dict(tensors: dict[str, dict[str, torch.Tensor]], shapes: dict[str, AdapterShape],
                        family: str) -> dict[str, torch.Tensor]:
    """peft tensors per component -> kohya keys, with an explicit `.alpha` for every module."""
    out: dict[str, torch.Tensor] = {}
    for component, state in tensors.items():
        shape = shapes[component]
        for key, tensor in state.items():
            module, _, part = key.rpartition(".lora_")
            name = module_name(component, module, family)
            if part == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor
                alpha = shape.alpha_pattern.get(module, shape.alpha)
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
            else:
                out[f"{name}.lora_up.weight"] = tensor
    return out


def from_kohya_state_dict(state: dict[str, torch.Tensor]):
    """kohya keys -> (peft tensors per component, shapes per component, unmatched keys)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if not match:
            unmatched.append(key)
            continue
        modules.setdefault(match["name"], {})[match["part"]] = tensor
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    ranks: dict[str, dict[str, int]] = {}
    for name, parts in modules.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            unmatched.extend(f"{name}.{part}" for part in parts)
            continue
        component, path = parse_module_name(name)
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = int(down.shape[0])
        tensors.setdefault(component, {})[f"{path}.lora_A.weight"] = down
        tensors[component][f"{path}.lora_B.weight"] = up
        ranks.setdefault(component, {})[path] = rank
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        alphas.setdefault(component, {})[path] = alpha
    shapes = {}
    for component, component_ranks in ranks.items():
        rank = Counter(component_ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas[component].values()).most_common(1)[0][0]
        shapes[component] = AdapterShape(
            rank=rank, alpha=alpha, target_modules=tuple(sorted(component_ranks)),
            rank_pattern={m: r for m, r in component_ranks.items() if r != rank},
            alpha_pattern={m: a for m, a in alphas[component].items() if a != alpha},
        )
    return tensors, shapes, unmatched
