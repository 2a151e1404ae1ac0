"""Reading LyCORIS-type adapter files (LoCon with a Tucker mid, LoHa, LoKr, DoRA on any of them) into per-layer parts.

Key layouts read (the layer name is everything before the part suffix):
- kohya / LyCORIS / OneTrainer "kohya": `lora_unet_<module>` / `lora_te_` / `lora_te1_` / `lora_te2_` names, as
  `formats.kohya` parses them (SD1/SD2 diffusers names; SDXL's SGM names through `formats.ldm`).
- OneTrainer's dotted names (its internal and diffusers outputs): `unet.<module>.<part>`, `text_encoder.`,
  `text_encoder_2.`, with `lora_A/lora_B.weight` standing for lora_down/lora_up and peft's
  `lora_magnitude_vector.weight` (shape [out]) for `dora_scale`.
- ComfyUI's own layout (also OneTrainer's "comfy" output): `diffusion_model.<SGM module>.<part>`,
  `text_encoders.clip_l|clip_h|clip_g.transformer.<module>.<part>`; plain lora_A/lora_B files in it come here too.
Parts per layer are LyCORIS' own (`deltas.PARTS`: `lora_up/down/mid.weight`, `hada_w1_a`..`hada_t2`,
`lokr_w1`..`lokr_t2`) plus `alpha` and `dora_scale`. Plain LoRA files (only lora_up/lora_down/alpha, or diffusers
lora_A/lora_B) never come here: `adapter.read_adapter` keeps reading them into peft's form, as before.

A bad file is refused whole, with the file and the offending keys named: unknown or partial key sets, two types
in one layer, LoKr factors that cannot form a weight, DoRA magnitudes missing or of the wrong shape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.formats import deltas, kohya, ldm
from sdlora.formats.adapter import AdapterFile, AdapterFormatError

_RENAMED = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
            "lora_magnitude_vector.weight": "dora_scale"}
_SUFFIXES = sorted({*(p for names in deltas.PARTS.values() for p in names), *deltas.SHARED_PARTS, *_RENAMED},
                   key=len, reverse=True)
_DOTTED = ("unet", "text_encoder", "text_encoder_2")
# ComfyUI's names of the text encoders (`text_encoders.clip_l.transformer.<module>`): SD1 and SDXL's first is
# CLIP-L, SD2's OpenCLIP-H, SDXL's second OpenCLIP-G.
_COMFY_ENCODERS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
_LYCORIS_ONLY = re.compile(r"\.(hada_\w+|lokr_\w+|dora_scale|lora_mid\.weight|lora_magnitude_vector\.weight)$")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
SHOWN = 8


@dataclass
class LycorisFile(AdapterFile):
    """An adapter of LyCORIS types: `layers[component][module path] = {part: tensor}`. `tensors`/`shapes` (peft's
    form) stay empty, so code written for plain LoRA sees no peft layers in it."""

    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def layer_items(self):
        for component, modules in self.layers.items():
            for path, parts in modules.items():
                yield component, path, parts


def network_args(metadata: dict[str, str]) -> dict:
    """kohya's `ss_network_args` (a JSON object: algo, conv_dim, dora_wd, factor, ...), {} when absent or bad."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def _declares_dora(metadata: dict[str, str]) -> bool:
    args = network_args(metadata)
    return any(str(args.get(k, "")).lower() == "true" for k in ("dora_wd", "weight_decompose"))


def is_lycoris(keys, metadata: dict[str, str] | None = None) -> bool:
    """Whether a file needs this reader: a LyCORIS-only part, OneTrainer's dotted lora_down/up, ComfyUI's names, or a
    DoRA header (a DoRA whose magnitudes are missing must be refused here, not read as a plain LoRA)."""
    keys = list(keys)
    return (any(_LYCORIS_ONLY.search(k) for k in keys) or _declares_dora(metadata or {})
            or any(k.partition(".")[0] in _DOTTED and k.endswith((".lora_down.weight", ".lora_up.weight"))
                   or k.startswith(("diffusion_model.", "text_encoders.")) for k in keys))


def _split(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], _RENAMED.get(suffix, suffix)
    return None


def _module(name: str) -> tuple[str, str] | None:
    """(component, diffusers module path) of a layer name, None when it follows no known convention."""
    if name.startswith(tuple(kohya.PREFIXES)) and _NAME.match(name):
        return kohya.parse_module_name(name)
    component, _, path = name.partition(".")
    if component in _DOTTED and path:
        return component, path.removeprefix("text_model.") if component == "text_encoder" else path
    if component == "diffusion_model" and path:  # ComfyUI / OneTrainer "comfy": the UNet under its SGM names
        return "unet", ldm.from_sgm(path)
    encoder, _, rest = path.partition(".transformer.")
    if component == "text_encoders" and encoder in _COMFY_ENCODERS and rest:
        component = _COMFY_ENCODERS[encoder]
        return component, rest.removeprefix("text_model.") if component == "text_encoder" else rest
    return None


def _listed(items) -> str:
    items = sorted(items)
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def from_state_dict(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LycorisFile:
    """Group the keys into layers and check each; the first problem is raised, naming the file and keys."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    names: dict[tuple[str, str], str] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = _split(key)
        module = _module(split[0]) if split else None
        if module is None:
            unknown.append(key)
            continue
        parts = grouped.setdefault(module, {})
        if split[1] in parts:
            unknown.append(key)  # two spellings of one part (lora_A and lora_down) for one module
        parts[split[1]] = tensor
        names[module] = split[0]
    if unknown:
        raise AdapterFormatError(
            f"{path}: {len(unknown)} key(s) match no known adapter layout (kohya/LyCORIS `lora_unet_<module>.<part>`"
            f", `unet.<module>.<part>` or ComfyUI's `diffusion_model.<module>.<part>`; parts lora_up/lora_down/lora_mid, hada_*, lokr_*, alpha, dora_scale): "
            f"{_listed(unknown)}. Nothing was loaded")
    dora = _declares_dora(metadata)
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for (component, module), parts in grouped.items():
        check_layer(path, names[(component, module)], parts, dora_declared=dora)
        layers.setdefault(component, {})[module] = parts
    return LycorisFile(tensors={}, shapes={}, metadata=dict(metadata), format="lycoris", layers=layers)


def _refuse(path, name: str, parts, why: str):
    keys = ", ".join(f"{name}.{p}" for p in sorted(parts))
    raise AdapterFormatError(f"{path}: layer {name} ({keys}): {why}; nothing was loaded")


def check_layer(path, name: str, parts: dict[str, torch.Tensor], dora_declared: bool = False) -> None:
    """One layer's parts form one adapter type, completely, with factors that agree (no base needed)."""
    algos = [a for a, names in deltas.PARTS.items() if any(p in parts for p in names)]
    if len(algos) > 1:
        _refuse(path, name, parts, f"mixes {' and '.join(NAMES[a] for a in algos)} keys in one layer; a layer holds "
                                   "one adapter type: the file is damaged or was merged wrongly")
    if not algos:
        _refuse(path, name, parts, "has no weights (only alpha/dora_scale): the file is incomplete")
    bad = [p for p, t in parts.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        _refuse(path, name, parts, f"{', '.join(sorted(bad))} hold NaN or infinite values: the file is damaged")
    if "alpha" in parts and parts["alpha"].numel() != 1:
        _refuse(path, name, parts, f"alpha has shape {list(parts['alpha'].shape)}, not one number")
    why = {"lora": _lora_problem, "loha": _loha_problem, "lokr": _lokr_problem}[algos[0]](parts)
    if why:
        _refuse(path, name, parts, why)
    if "dora_scale" in parts:
        m, out = parts["dora_scale"], delta_out(parts)
        per_out = m.shape[0] == out and all(s == 1 for s in m.shape[1:])
        per_in = m.dim() >= 2 and m.shape[0] == 1
        if not (per_out or per_in):
            _refuse(path, name, parts, f"dora_scale has shape {list(m.shape)}; DoRA magnitudes are one per output "
                                       f"channel ([{out}, 1, ...]) or per input channel ([1, in, ...])")
    elif dora_declared:
        _refuse(path, name, parts, "the header declares DoRA (ss_network_args dora_wd) but this layer has no "
                                   "dora_scale magnitudes: the file is incomplete, and without them it would load "
                                   "as a different adapter")


def _need(parts, names) -> str | None:
    missing = [n for n in names if n not in parts]
    return f"missing {', '.join(missing)}: the layer is incomplete" if missing else None


def _dims(parts, *names) -> str:
    return ", ".join(f"{n} {list(parts[n].shape)}" for n in names if n in parts)


def _lora_problem(parts) -> str | None:
    if why := _need(parts, ("lora_up.weight", "lora_down.weight")):
        return why
    up, down, mid = parts["lora_up.weight"], parts["lora_down.weight"], parts.get("lora_mid.weight")
    rank = down.shape[0]
    if up.dim() not in (2, 4) or down.dim() != up.dim() or up.shape[1] != rank or (
            mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, up.shape[1]))):
        return (f"the factors do not agree ({_dims(parts, 'lora_up.weight', 'lora_down.weight', 'lora_mid.weight')}"
                "; up is [out, rank], down [rank, in], mid [rank, rank, kh, kw])")
    return None


def _loha_problem(parts) -> str | None:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if why := _need(parts, names):
        return why
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        return "has one Tucker core (hada_t1/hada_t2) without the other"
    w1a, w1b, w2a, w2b = (parts[n] for n in names)
    tucker = "hada_t1" in parts
    if tucker:
        t1, t2 = parts["hada_t1"], parts["hada_t2"]
        ok = (all(t.dim() == 2 for t in (w1a, w1b, w2a, w2b)) and t1.shape == t2.shape and t1.dim() >= 3
              and t1.shape[0] == w1a.shape[0] and t1.shape[1] == w1b.shape[0]
              and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1])
    else:
        ok = (all(t.dim() == 2 for t in (w1a, w1b, w2a, w2b)) and w1a.shape[1] == w1b.shape[0]
              and w2a.shape[1] == w2b.shape[0] and w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1])
    if not ok:
        return (f"the factors do not agree ({_dims(parts, *names, 'hada_t1', 'hada_t2')}; "
                "w?_a is [out, rank] and w?_b [rank, in], or with Tucker cores w?_a [rank, out], w?_b [rank, in])")
    return None


def _lokr_problem(parts) -> str | None:
    for half in ("w1", "w2"):
        whole, pair = f"lokr_{half}" in parts, (f"lokr_{half}_a" in parts, f"lokr_{half}_b" in parts)
        if whole and any(pair):
            return f"has lokr_{half} and its low-rank pair lokr_{half}_a/_b at once; LoKr uses one of them"
        if not whole and not all(pair):
            return f"missing lokr_{half} (or both lokr_{half}_a and lokr_{half}_b): the layer is incomplete"
    if "lokr_t2" in parts and "lokr_w2" in parts:
        return "has a Tucker core lokr_t2 with a whole lokr_w2; the core belongs to the w2_a/w2_b pair"
    names = [n for n in deltas.PARTS["lokr"] if n in parts]
    w1 = parts.get("lokr_w1")
    if w1 is None:
        a, b = parts["lokr_w1_a"], parts["lokr_w1_b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            return f"impossible LoKr factor shapes ({_dims(parts, *names)}): lokr_w1_a [a, r] and lokr_w1_b [r, b]"
    elif w1.dim() != 2:
        return f"impossible LoKr factor shapes ({_dims(parts, *names)}): lokr_w1 is a matrix [a, b]"
    if "lokr_w2" in parts:
        ok = parts["lokr_w2"].dim() in (2, 4)
    elif "lokr_t2" in parts:
        a, b, t = parts["lokr_w2_a"], parts["lokr_w2_b"], parts["lokr_t2"]
        ok = a.dim() == 2 and b.dim() == 2 and t.dim() == 4 and tuple(t.shape[:2]) == (a.shape[0], b.shape[0])
    else:
        a, b = parts["lokr_w2_a"], parts["lokr_w2_b"]
        ok = a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0]
    if not ok:
        return (f"impossible LoKr factor shapes ({_dims(parts, *names)}): lokr_w2 is [c, d(, kh, kw)], the pair "
                "lokr_w2_a [c, r] and lokr_w2_b [r, d]")
    return None


def delta_out(parts) -> int:
    """Output size of the layer's ΔW, read off its factors."""
    algo = deltas.layer_algo(parts)
    if algo == "lora":
        return int(parts["lora_up.weight"].shape[0])
    if algo == "loha":
        return int(parts["hada_w1_a"].shape[1 if "hada_t1" in parts else 0])
    a = parts["lokr_w1"].shape[0] if "lokr_w1" in parts else parts["lokr_w1_a"].shape[0]
    c = (parts["lokr_w2"].shape[0] if "lokr_w2" in parts else
         parts["lokr_w2_a"].shape[1] if "lokr_t2" in parts else parts["lokr_w2_a"].shape[0])
    return int(a * c)


def layer_rank(parts) -> int | None:
    """The layer's rank as LyCORIS names it (`network_dim`); None for a LoKr made only of whole factors."""
    algo = deltas.layer_algo(parts)
    if algo == "lora":
        return int(parts["lora_down.weight"].shape[0])
    if algo == "loha":
        return int(parts["hada_w1_b"].shape[0])
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in parts:
            return int(parts[name].shape[0])
    return None


def layer_alpha(parts) -> float | None:
    return float(parts["alpha"].item()) if "alpha" in parts else None


def check_fit(path, name: str, parts, weight_shape: tuple[int, ...]) -> str | None:
    """Why this layer cannot apply to a base weight of `weight_shape` (None when it can)."""
    out, numel = weight_shape[0], math.prod(weight_shape)
    if delta_out(parts) != out:
        return f"its update has {delta_out(parts)} outputs, the base layer {out}"
    algo = deltas.layer_algo(parts)
    if algo == "lokr":  # the in-side product b·d(·kh·kw) must be the base's too: the shapes must factor exactly
        b = parts["lokr_w1"].shape[1] if "lokr_w1" in parts else parts["lokr_w1_b"].shape[1]
        w2 = parts.get("lokr_w2")
        d = (math.prod(w2.shape[1:]) if w2 is not None else
             parts["lokr_w2_b"].shape[1] * math.prod(parts["lokr_t2"].shape[2:]) if "lokr_t2" in parts
             else parts["lokr_w2_b"].shape[1])
        if out * b * d != numel:
            return (f"impossible LoKr factor shapes for the base layer {list(weight_shape)}: kron of w1 "
                    f"[.., {b}] and w2 [.., {d}] gives {b * d} inputs, the layer has {numel // out}")
        return None
    if algo == "lora":
        down, mid = parts["lora_down.weight"], parts.get("lora_mid.weight")
        shape = (out, down.shape[1], *(mid if mid is not None else down).shape[2:])
    elif "hada_t1" in parts:
        shape = (out, parts["hada_w1_b"].shape[1], *parts["hada_t1"].shape[2:])
    else:  # plain LoHa keeps a conv's kernel flattened into its in-side
        shape = (out, parts["hada_w1_b"].shape[1])
    if math.prod(shape) != numel or (len(shape) == len(weight_shape) and tuple(shape) != tuple(weight_shape)):
        return f"its update has shape {list(shape)}, the base layer {list(weight_shape)}"
    m = parts.get("dora_scale")
    if m is not None and m.shape[0] == 1 and m.dim() >= 2 and m.shape[1] != weight_shape[1]:
        return f"dora_scale {list(m.shape)} has not one magnitude per input channel ({weight_shape[1]})"
    return None


# ---------------------------------------------------------------------------------------------------------------
# `sdlora info`


def _common(values):
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def _is_conv(parts) -> bool:
    return any(t.dim() == 4 and any(s > 1 for s in t.shape[2:]) for p, t in parts.items() if p != "dora_scale")


def adapter_type(adapter: AdapterFile) -> str:
    """lora, locon, dora, loha or lokr: the algorithm, with LoRA on 3x3 convs named LoCon and LoRA+DoRA DoRA."""
    if not isinstance(adapter, LycorisFile):
        convs = any(t.dim() == 4 and any(s > 1 for s in t.shape[2:])
                    for state in adapter.tensors.values() for t in state.values())
        return "locon" if convs else "lora"
    layers = [parts for _, _, parts in adapter.layer_items()]
    algo = _common([deltas.layer_algo(p) for p in layers])
    if algo == "lora":
        return "dora" if any("dora_scale" in p for p in layers) else "locon" if any(map(_is_conv, layers)) else "lora"
    return algo


def inferred_options(adapter: LycorisFile) -> dict:
    """The options a file's keys show (when its header has no ss_network_args)."""
    layers = [parts for _, _, parts in adapter.layer_items()]
    options: dict = {}
    convs = [p for p in layers if _is_conv(p)]
    if convs:
        options.update(conv_layers=len(convs), conv_dim=_common([layer_rank(p) for p in convs]),
                       conv_alpha=_common([layer_alpha(p) for p in convs]))
    if any(k in p for p in layers for k in ("lora_mid.weight", "hada_t1", "lokr_t2")):
        options["use_tucker"] = True
    doras = [p["dora_scale"] for p in layers if "dora_scale" in p]
    if doras:
        options.update(dora_wd=True, wd_on_out=not any(m.dim() >= 2 and m.shape[0] == 1 for m in doras))
    lokrs = [p for p in layers if deltas.layer_algo(p) == "lokr"]
    if lokrs:
        options["decompose_both"] = any("lokr_w1_a" in p for p in lokrs)
        options["full_matrix"] = all("lokr_w2" in p for p in lokrs)
        shapes = [tuple(p["lokr_w1"].shape) if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
                  for p in lokrs]
        options["w1_shape"] = list(_common(shapes))  # LyCORIS' `factor` picks it
    return options


def describe(path: str | Path, full: bool = False) -> dict:
    """`sdlora info` (exported as `formats.describe`) for any adapter file: `adapter.describe`'s report plus the
    adapter type, its options (from `ss_network_args` when the header has it, else read off the keys) and, for
    LyCORIS types, rank and alpha."""
    from sdlora.formats.adapter import describe as describe_plain
    from sdlora.formats.adapter import read_adapter

    report = describe_plain(path, full)
    adapter = read_adapter(path)
    kind = adapter_type(adapter)
    args = network_args(adapter.metadata)
    report["type"] = kind
    if isinstance(adapter, LycorisFile):
        report["components"] = {
            component: {"type": kind, "rank": _common([layer_rank(p) for p in modules.values()]),
                        "alpha": _common([layer_alpha(p) for p in modules.values()]), "modules": len(modules),
                        "dtype": str(next(iter(next(iter(modules.values())).values())).dtype).removeprefix("torch.")}
            for component, modules in adapter.layers.items()}
        report["options"] = args or inferred_options(adapter)
    else:
        report["options"] = args or ({"conv layers": "yes"} if kind == "locon" else {})
    report["options_from"] = "ss_network_args" if args else "keys"
    return report
