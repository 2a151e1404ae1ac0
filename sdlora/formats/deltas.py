"""The weight update ΔW each adapter type adds to one layer: LoRA/LoCon, LoHa, LoKr, and DoRA on top of any of them.

Stable API (other modules, e.g. convert/resize, import these names; keep them and their signatures):

- `lora_delta(up, down, mid=None, alpha=None)`: LoRA / LoCon, `(alpha/r) · up @ down`; conv kernels (3x3 down +
  1x1 up) and LoCon's Tucker `lora_mid`.
- `loha_delta(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, alpha=None, shape=None)`: LoHa, `(alpha/r) ·
  (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`, and the Tucker `hada_t1/hada_t2` form.
- `lokr_delta(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None, alpha=None, shape=None)`:
  LoKr, `scale · kron(w1, w2)` with either half given whole or as a low-rank pair; `lokr_scale` is its scale.
- `dora_weight(base, delta, dora_scale, multiplier=1.0)`: the layer's new weight under DoRA.
- `layer_algo(parts)`: "lora", "loha" or "lokr" from the key suffixes of one layer (None when none matches).
- `layer_delta(parts, *, shape=None, base=None, multiplier=1.0)`: the change of one layer's weight, any type,
  from `parts` = {suffix: tensor} with the suffixes LyCORIS writes (`lora_up.weight`, `hada_w1_a`, `lokr_w1`,
  `alpha`, `dora_scale`, ...); DoRA layers need `base`.

Shapes follow LyCORIS 4.1.3 (`lycoris/modules/{locon,loha,lokr}.py`), the layout ComfyUI and AUTOMATIC1111 read.
Maths is done in at least float32; nothing here validates shapes (`formats.lycoris` refuses bad files first).
"""

from __future__ import annotations

import torch

# Key suffixes of one layer, per algorithm (without "alpha" and "dora_scale", which any of them may carry).
PARTS = {
    "lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
SHARED_PARTS = ("alpha", "dora_scale")


def _f(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _scale(alpha, rank: int) -> float:
    # kohya/LyCORIS: a missing alpha, or alpha 0, means alpha = rank (no scaling).
    if alpha is None:
        return 1.0
    a = float(alpha)
    return 1.0 if a == 0 else a / rank


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # core t (r1, r2, *k) with a (r1, out) on its first mode and b (r2, in) on its second -> (out, in, *k).
    return torch.einsum("i j ..., i p, j q -> p q ...", t, a, b)


def lora_delta(up, down, mid=None, alpha=None) -> torch.Tensor:
    """ΔW of a LoRA/LoCon layer: up (out, r[,1,1]), down (r, in[, kh, kw]), optional Tucker mid (r, r, kh, kw)."""
    up, down, mid = _f(up), _f(down), _f(mid)
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank)
    if mid is None:
        delta = (up2 @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])
    else:  # down (r, in, 1, 1) then mid (r, r, kh, kw) then up (out, r, 1, 1)
        delta = _tucker(mid, up2.T, down.reshape(rank, -1))
    return delta * _scale(alpha, rank)


def loha_delta(w1_a, w1_b, w2_a, w2_b, t1=None, t2=None, alpha=None, shape=None) -> torch.Tensor:
    """ΔW of a LoHa layer. Plain: w?_a (out, r), w?_b (r, in·k·k). Tucker: w?_a (r, out), w?_b (r, in), t? (r, r, *k)."""
    w1_a, w1_b, w2_a, w2_b, t1, t2 = map(_f, (w1_a, w1_b, w2_a, w2_b, t1, t2))
    rank = w1_b.shape[0]
    if t1 is not None:
        delta = _tucker(t1, w1_a, w1_b) * _tucker(t2, w2_a, w2_b)
    else:
        delta = (w1_a @ w1_b) * (w2_a @ w2_b)
    delta = delta * _scale(alpha, rank)
    return delta if shape is None else delta.reshape(shape)


def lokr_scale(w1_b=None, w2_b=None, alpha=None) -> float:
    """LoKr's scale: alpha/r only when a half is a low-rank pair (r = that pair's inner size), else 1.

    LyCORIS (`LokrModule.__init__`: "if use_w1 and use_w2: alpha = lora_dim") and ComfyUI (`dim` from w1_b/w2_b)
    agree. The rank is read off `*_b`'s first axis, which is r in the plain and the Tucker layout alike.
    """
    if w1_b is not None:
        return _scale(alpha, w1_b.shape[0])
    if w2_b is not None:
        return _scale(alpha, w2_b.shape[0])
    return 1.0


def lokr_delta(w1=None, w1_a=None, w1_b=None, w2=None, w2_a=None, w2_b=None, t2=None, alpha=None,
               shape=None) -> torch.Tensor:
    """ΔW of a LoKr layer: kron(w1, w2), w1 = w1 or w1_a @ w1_b, w2 = w2 or w2_a @ w2_b or Tucker(t2, w2_a, w2_b).

    Conv layers: a whole w2 is (c, d, kh, kw); a plain pair stores w2_b flattened (r, d·kh·kw), so the kron is 2-D
    and `shape` restores the kernel axes; Tucker stores w2_a (r, c), w2_b (r, d), t2 (r, r, kh, kw).
    """
    scale = lokr_scale(w1_b if w1 is None else None, w2_b if w2 is None else None, alpha)
    w1, w1_a, w1_b, w2, w2_a, w2_b, t2 = map(_f, (w1, w1_a, w1_b, w2, w2_a, w2_b, t2))
    if w1 is None:
        w1 = w1_a @ w1_b
    if w2 is None:
        w2 = _tucker(t2, w2_a, w2_b) if t2 is not None else w2_a @ w2_b
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)  # kron over the kernel axes with w1 constant along them
    delta = torch.kron(w1, w2.contiguous()) * scale
    return delta if shape is None else delta.reshape(shape)


def dora_weight(base, delta, dora_scale, multiplier: float = 1.0) -> torch.Tensor:
    """The layer's weight with a DoRA adapter: W' = W + ΔW rescaled to the magnitudes m = dora_scale, mixed by weight.

    Orientation comes from dora_scale's shape, as ComfyUI decides it: (out, 1, ...) normalises each output row
    (LyCORIS' default `wd_on_out=True`, peft's magnitude vector), (1, in, ...) each input column (LyCORIS before
    `wd_on_out`, and `wd_on_out=False`). The norm carries LyCORIS' `+ eps` so results match it to rounding.
    At multiplier s the result is W + s·(DoRA(W + ΔW) − W), as ComfyUI and AUTOMATIC1111 apply it: s = 0 is the
    base, and two adapters at s1, s2 add. (LyCORIS' own multiplier scales only the rescale, leaving W + ΔW at s = 0;
    at s = 1 all three agree.)
    """
    base_f = _f(base)
    merged = base_f + _f(delta)
    m = _f(dora_scale)
    eps = torch.finfo(m.dtype).eps
    if m.shape[0] == merged.shape[0] and (m.dim() == 1 or m.shape[1] == 1):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
        norm = norm.reshape(merged.shape[0], *[1] * (merged.dim() - 1))
        m = m.reshape(norm.shape)
    else:  # (1, in, ...): the norm of each input column over the output and kernel axes
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
        m = m.reshape(norm.shape)
    full = merged * (m / (norm + eps))
    return base_f + multiplier * (full - base_f) if multiplier != 1 else full


def layer_algo(parts) -> str | None:
    """Which algorithm the key suffixes of one layer belong to ("lora", "loha", "lokr"), None if none."""
    for algo, names in PARTS.items():
        if any(name in parts for name in names):
            return algo
    return None


def layer_delta(parts, *, shape=None, base=None, multiplier: float = 1.0) -> torch.Tensor:
    """multiplier·ΔW of one layer (or, for DoRA, W' − W), from its {suffix: tensor}; reshaped to `shape`/base's."""
    if shape is None and base is not None:
        shape = tuple(base.shape)
    alpha = parts.get("alpha")
    algo = layer_algo(parts)
    if algo == "lora":
        delta = lora_delta(parts["lora_up.weight"], parts["lora_down.weight"], parts.get("lora_mid.weight"), alpha)
    elif algo == "loha":
        delta = loha_delta(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                           parts.get("hada_t1"), parts.get("hada_t2"), alpha)
    else:
        delta = lokr_delta(*(parts.get(name) for name in PARTS["lokr"]), alpha=alpha)
    if shape is not None:
        delta = delta.reshape(shape)
    if "dora_scale" in parts:
        return dora_weight(base, delta, parts["dora_scale"], multiplier) - _f(base)
    return delta * multiplier
