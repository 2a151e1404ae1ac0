"""Low-rank approximation of layer updates: the one place sdlora's SVD maths lives (merge --rank, resize, convert
--to lora, extract). Tensors only.

A layer's update ΔW (a Linear's [out, in], or a Conv2d's [out, in, kh, kw] flattened to [out, in*kh*kw], as LoCon
does) is replaced by its best rank-k approximation in the Frobenius norm, the truncated SVD (Eckart-Young):
up = U_k sqrt(S_k), down = sqrt(S_k) V_k^T. The singular values are split evenly between the two factors so
neither holds values far outside the other's range (an fp16 file keeps both in range). The relative error of a
layer is ||ΔW - up @ down||_F / ||ΔW||_F = sqrt(sum of the dropped S^2) / sqrt(sum of all S^2); the overall error
of a file is the same ratio over all its layers together (a large layer weighs more than a small one).

When ΔW is itself a product B @ A of rank r (a LoRA being resized), the out x in matrix is never formed: with
B = Q_b R_b and A^T = Q_a R_a, B @ A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the r x r core gives the same
singular values and vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdlora.formats.adapter import AdapterFormatError
from sdlora.models.lora import AdapterShape


@dataclass(frozen=True)
class Factors:
    """One layer's rank-k approximation: `up @ down` (alpha = k, so scale 1) and how far it is from the update."""

    down: torch.Tensor  # [k, in] or [k, in, kh, kw]
    up: torch.Tensor  # [out, k] or [out, k, 1, 1]
    norm: float  # ||ΔW||_F
    residual: float  # ||ΔW - up @ down||_F

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def error(self) -> float:
        """Relative Frobenius error; 0 for a layer whose update is zero."""
        return self.residual / self.norm if self.norm > 0 else 0.0


def rank_for_error(singular: torch.Tensor, error: float) -> int:
    """The smallest k whose truncation leaves a relative Frobenius error <= `error` (at least 1)."""
    energy = singular.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    # tail[k] = sum of S_i^2 for i >= k: the squared residual when k values are kept
    tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]).tolist() + [0.0]
    budget = error * error * total
    return max(1, next(k for k, rest in enumerate(tail) if rest <= budget))


def _choose(singular: torch.Tensor, rank: int | None, error: float | None) -> int:
    """Rank to keep: `rank`, or the smallest reaching `error` (capped by `rank` when both are given)."""
    k = rank_for_error(singular, error) if error is not None else rank
    if error is not None and rank is not None:
        k = min(k, rank)
    return max(1, min(int(k), singular.numel()))


def _svd(matrix: torch.Tensor, what: str):
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        raise AdapterFormatError(f"{what}: the SVD did not converge (values too large to decompose)") from None


def _split(u, s, vh, k: int, out_shape: tuple[int, ...], in_shape: tuple[int, ...], dtype: torch.dtype):
    root = s[:k].sqrt()
    up = (u[:, :k] * root).to(dtype).reshape(out_shape[0], k, *([1] * (len(in_shape) - 1)))
    down = (root[:, None] * vh[:k]).to(dtype).reshape(k, *in_shape)
    return down.contiguous(), up.contiguous()


def _residual(singular: torch.Tensor, k: int) -> float:
    return math.sqrt(float(singular[k:].double().pow(2).sum()))


def factorize(delta: torch.Tensor, rank: int | None = None, error: float | None = None, *,
              clamp_quantile: float | None = None, dtype: torch.dtype = torch.float32, what: str = "layer") -> Factors:
    """Best rank-k factors of a full update ΔW ([out, in] or [out, in, kh, kw]); k from `rank` and/or `error`.

    `clamp_quantile` (kohya's extract option, e.g. 0.99): clip both factors' values to that quantile of their
    magnitudes, trading a measured extra error for a file without outliers; the residual is then measured, not
    read off the singular values."""
    out, in_shape = int(delta.shape[0]), tuple(int(d) for d in delta.shape[1:])
    matrix = delta.reshape(out, -1).float()
    u, s, vh = _svd(matrix, what)
    k = _choose(s, rank, error)
    down, up = _split(u, s, vh, k, (out,), in_shape, dtype)
    norm = float(s.double().pow(2).sum().sqrt())
    if clamp_quantile is None:
        return Factors(down, up, norm, _residual(s, k))
    values = torch.cat([up.flatten(), down.flatten()]).abs().float()
    limit = float(torch.quantile(values[: 1 << 24], clamp_quantile))  # torch.quantile refuses longer inputs
    down, up = down.clamp(-limit, limit), up.clamp(-limit, limit)
    product = up.reshape(out, k).float() @ down.reshape(k, -1).float()
    return Factors(down, up, norm, float(torch.linalg.matrix_norm(matrix - product)))


def factorize_product(down: torch.Tensor, up: torch.Tensor, scale: float = 1.0, rank: int | None = None,
                      error: float | None = None, *, what: str = "layer") -> Factors:
    """Best rank-k factors of `scale * up @ down` (a LoRA layer), computed from QR factors of both, never forming
    the out x in matrix; k from `rank` and/or `error`. The new factors keep the input's dtype."""
    out, in_shape = int(up.shape[0]), tuple(int(d) for d in down.shape[1:])
    a_flat, b_flat = down.reshape(down.shape[0], -1).double(), up.reshape(out, -1).double() * scale
    try:
        # Reading refuses non-finite files, so this only guards products that overflow even in float64.
        q_b, r_b = torch.linalg.qr(b_flat)
        q_a, r_a = torch.linalg.qr(a_flat.T)
    except torch.linalg.LinAlgError:
        raise AdapterFormatError(f"{what}: the SVD did not converge (values too large to decompose)") from None
    u, s, vh = _svd(r_b @ r_a.T, what)
    k = _choose(s, rank, error)
    new_down, new_up = _split(q_b @ u, s, vh @ q_a.T, k, (out,), in_shape, down.dtype)
    norm = float(s.pow(2).sum().sqrt())
    return Factors(new_down, new_up, norm, _residual(s, k))


def overall_error(layers) -> float:
    """Relative Frobenius error of all `layers` (Factors) together: sqrt(sum residual^2) / sqrt(sum norm^2)."""
    norm = sum(f.norm ** 2 for f in layers)
    return math.sqrt(sum(f.residual ** 2 for f in layers) / norm) if norm > 0 else 0.0


def uniform_alpha(state: dict[str, torch.Tensor], ranks: dict[str, int]) -> AdapterShape:
    """One alpha for every module (loaders disagree on per-module alphas: diffusers mis-scales kohya's): alpha =
    the most common rank, and a module of another rank r gets its B scaled by r / alpha, so every module's update
    stays exactly B @ A. `state` (peft keys `<module>.lora_B.weight`) is changed in place."""
    values = list(ranks.values())
    rank = max(set(values), key=values.count)
    for module, module_rank in ranks.items():
        if module_rank != rank:
            state[f"{module}.lora_B.weight"] = state[f"{module}.lora_B.weight"] * (module_rank / rank)
    return AdapterShape(rank=rank, alpha=float(rank), target_modules=tuple(sorted(ranks)),
                        rank_pattern={m: r for m, r in ranks.items() if r != rank})
