"""Rewrite an adapter as a plain LoRA of another rank, layer by layer, and say how far each layer moved.

`sdlora resize` (kohya's resize_lora) and `sdlora convert --to lora` both come here: every layer's update ΔW is
replaced by its truncated SVD (`formats.lowrank`) at a fixed rank, or at the smallest rank whose relative Frobenius
error reaches a target. The result is a plain LoRA with alpha = rank (module scales folded into lora_B), which
diffusers, peft, kohya, A1111 and ComfyUI all scale the same way. The `Report` holds each layer's rank before and
after and its relative error, and the whole file's error (all layers' residuals over all layers' updates).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sdlora.formats import lowrank
from sdlora.formats.adapter import COMPONENTS, AdapterFile, AdapterFormatError, check_target, read_adapter
from sdlora.formats.adapter import save_adapter as _save

PROGRESS_FROM = 64  # layers: a file with more shows a progress bar on stderr (an SDXL LoRA has ~700)
# Header fields that describe the old tensors; the writers put back fresh ones.
_STALE = ("ss_network_module", "ss_network_args", "ss_network_dim", "ss_network_alpha", "sshs_model_hash",
          "sshs_legacy_hash", "modelspec.hash_sha256",
          "lora_adapter_metadata", "format")


@dataclass(frozen=True)
class Layer:
    """One layer's update, to be re-factored: `solve(rank, error)` returns its `lowrank.Factors`."""

    component: str
    module: str
    before: str  # what the layer was: "16" for a rank-16 LoRA layer, "loha 8" for a LyCORIS one
    solve: Callable[[int | None, float | None], lowrank.Factors]
    rank: int | None = None  # this layer's own rank, over the one asked for all (extract's conv rank)


@dataclass(frozen=True)
class LayerError:
    layer: str
    before: str
    rank: int
    error: float


@dataclass(frozen=True)
class Report:
    layers: list[LayerError]
    overall: float
    target: float | None = None  # the --error asked for, if any

    def missed(self) -> list[LayerError]:
        """Layers above the target error (only possible when --rank caps the rank too)."""
        return [row for row in self.layers if self.target is not None and row.error > self.target * (1 + 1e-6)]

    def table(self) -> str:
        """A compact per-layer table and the overall line, for the terminal."""
        width = max([len("layer"), len("overall"), *(len(row.layer) for row in self.layers)])
        ranks = [f"{row.before} -> {row.rank}" for row in self.layers]
        rank_width = max([len("rank"), *map(len, ranks)])
        lines = [f"{'layer':<{width}}  {'rank':<{rank_width}}  relative error"]
        lines += [f"{row.layer:<{width}}  {r:<{rank_width}}  {row.error:.3g}" for row, r in zip(self.layers, ranks)]
        worst = max(self.layers, key=lambda row: row.error)
        lines.append(f"{'overall':<{width}}  {'':<{rank_width}}  {self.overall:.3g} "
                     f"({len(self.layers)} layers; worst {worst.error:.3g} in {worst.layer})")
        missed = self.missed()
        if missed:
            lines.append(f"{len(missed)} layer(s) above the target error {self.target:g}: the rank limit stopped them")
        return "\n".join(lines)


def lora_layers(adapter: AdapterFile) -> list[Layer]:
    """The layers of a plain LoRA (or LoCon) file: scale * B @ A, re-factored without forming the full matrix."""
    layers = []
    for component in adapter.components:
        shape, tensors = adapter.shapes[component], adapter.tensors[component]
        for key, down in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            up, rank = tensors[f"{module}.lora_B.weight"], int(down.shape[0])
            scale = float(shape.alpha_pattern.get(module, shape.alpha)) / rank
            where = f"{component}.{module}"

            def solve(new_rank, error, down=down, up=up, scale=scale, where=where):
                return lowrank.factorize_product(down.float(), up.float(), scale, new_rank, error, what=where)

            layers.append(Layer(component, module, str(rank), solve))
    return layers


def rebuild(layers: Iterable[Layer], rank: int | None, error: float | None, metadata: dict[str, str],
            progress: bool = False) -> tuple[AdapterFile, Report]:
    """A plain LoRA (float32) from `layers`, each at `rank` or at the smallest rank reaching `error` (both: `rank`
    caps it)."""
    layers = list(layers)
    if not layers:
        raise AdapterFormatError("the adapter holds no layers to re-factor")
    states: dict[str, dict] = {}
    ranks: dict[str, dict[str, int]] = {}
    rows, solved = [], []
    for layer in _progress(layers, progress):
        factors = layer.solve(layer.rank or rank, error)
        state = states.setdefault(layer.component, {})
        state[f"{layer.module}.lora_A.weight"] = factors.down.float()
        state[f"{layer.module}.lora_B.weight"] = factors.up.float()
        ranks.setdefault(layer.component, {})[layer.module] = factors.rank
        rows.append(LayerError(f"{layer.component}.{layer.module}", layer.before, factors.rank, factors.error))
        solved.append(factors)
    shapes = {c: lowrank.uniform_alpha(states[c], ranks[c]) for c in states}
    tensors = {c: states[c] for c in COMPONENTS if c in states}
    kept = {k: v for k, v in metadata.items() if k not in _STALE}
    return AdapterFile(tensors, shapes, kept), Report(rows, lowrank.overall_error(solved), error)


def _progress(items: list, enabled: bool):
    if not enabled or len(items) < PROGRESS_FROM:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="layers", unit="layer", file=sys.stderr, leave=False)


def check_target_args(rank: int | None, error: float | None, option: str) -> None:
    if rank is None and error is None:
        raise AdapterFormatError(f"{option}: give --rank R (a fixed rank) or --error E (a target relative error)")
    if rank is not None and rank < 1:
        raise AdapterFormatError(f"{option} --rank {rank}: the rank must be at least 1")
    if error is not None and not 0.0 <= error < 1.0:
        raise AdapterFormatError(f"{option} --error {error}: give a relative error between 0 and 1, e.g. 0.05")


def record(metadata: dict[str, str], what: str, before: str, rank: int | None, report: Report) -> None:
    """What was done, in the header: sdlora's own JSON field and kohya's training comment (as resize_lora writes)."""
    fields = {"from_rank": before, "rank": rank, "target_error": report.target, "overall_error": report.overall,
              "max_layer_error": max(row.error for row in report.layers)}
    metadata[f"sdlora.{what}"] = json.dumps(fields, sort_keys=True)
    target = f"rank {rank}" if report.target is None else f"error {report.target:g}" + (
        f" (at most rank {rank})" if rank is not None else "")
    comment = metadata.get("ss_training_comment", "")
    note = f"{what} from rank {before} to {target}, relative error {report.overall:.3g}"
    metadata["ss_training_comment"] = f"{note}; {comment}" if comment else note


def original_rank(adapter: AdapterFile) -> str:
    ranks = sorted({int(t.shape[0]) for c in adapter.components for k, t in adapter.tensors[c].items()
                    if k.endswith(".lora_A.weight")})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def resize_file(source: str | Path, target: str | Path, rank: int | None = None, error: float | None = None,
                to: str | None = None, dtype=None, progress: bool = False) -> tuple[Path, Report]:
    """`sdlora resize`: a LoRA file at a lower rank (or at a target error), in its own layout and dtype unless
    `to` / `dtype` (a torch dtype) say otherwise."""
    check_target_args(rank, error, "resize")
    check_target(target, "resize: output")
    adapter = read_adapter(source)
    if getattr(adapter, "layers", None):  # a LyCORIS type (formats.lycoris.LycorisFile)
        raise AdapterFormatError(f"{source}: resize re-ranks plain LoRA and LoCon files; for a LoHa, LoKr or DoRA "
                                 "use convert --to lora --rank R (a plain LoRA of that rank)")
    before = original_rank(adapter)
    resized, report = rebuild(lora_layers(adapter), rank, error, adapter.metadata, progress)
    record(resized.metadata, "resize", before, rank, report)
    return _save(target, resized, to or adapter.format, dtype or input_dtype(adapter)), report


def input_dtype(adapter: AdapterFile):
    return next(iter(adapter.tensors[adapter.components[0]].values())).dtype

