"""Labelled image grids over adapter weights, prompts or seeds: how people pick the weight of a LoRA.

Each cell is rendered by `inference.generate` with the stack's weights set for that cell, so a cell has the same
pixels as a separate `sdlora generate` call with those settings; `inference.image_grid` pastes cells unscaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from sdlora import inference
from sdlora.inference.pipeline import GenerationSettingError


@dataclass(frozen=True)
class Axis:
    """One grid axis: `kind` is 'weight' (of adapter number `adapter`), 'prompt' or 'seed'."""

    kind: str
    values: tuple
    adapter: int = 0

    def label(self, value) -> str:
        if self.kind == "weight":
            return f"#{self.adapter} {float(value):g}"
        return str(value)[:24]


@dataclass
class Cell:
    prompt: str
    seed: int
    weights: dict[int, tuple[float, float]] = field(default_factory=dict)


def parse_values(text: str, option: str = "values") -> tuple[float, ...]:
    """`0,0.5,1` or a range `0:1:0.25` (start:stop:step, stop included). `option` names the flag in errors."""
    is_range = text.count(":") == 2
    try:
        numbers = [float(x) for x in (text.split(":") if is_range else text.split(",")) if is_range or x.strip()]
    except ValueError:
        raise GenerationSettingError(f"{option} {text!r}: expected numbers, e.g. 0,0.5,1 or 0:1:0.25") from None
    if is_range:
        start, stop, step = numbers
        if step <= 0:
            raise GenerationSettingError(f"{option} {text!r}: the step must be positive, e.g. 0:1:0.25")
        numbers = [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]
    if not numbers:
        raise GenerationSettingError(f"{option} {text!r}: give at least one value, e.g. 0,0.5,1 or 0:1:0.25")
    return tuple(numbers)


def prompt_of_cells(prompt: str | None, columns: Axis, rows: Axis | None) -> str:
    """The prompt of the cells no prompt axis sets: `--prompt`, which only a grid with a prompt axis can go without."""
    if prompt is not None:
        return prompt
    if "prompt" in (columns.kind, rows.kind if rows else None):
        return ""  # every cell takes its prompt from the axis
    raise GenerationSettingError("--prompt: give the prompt, or put prompts on an axis: --x prompt --x-values 'a|b'")


def plan(columns: Axis, rows: Axis | None, prompt: str, seed: int, specs: list[inference.AdapterSpec]) -> list[list[Cell]]:
    """The cells, row by row; adapters not on an axis keep the weight their spec gives them."""
    grid = []
    for row_value in rows.values if rows else (None,):
        line = []
        for column_value in columns.values:
            cell = Cell(prompt, seed, {i: (s.unet_weight, s.te_weight) for i, s in enumerate(specs)})
            for axis, value in ((rows, row_value), (columns, column_value)):
                if axis is None:
                    continue
                if axis.kind == "weight":
                    cell.weights[axis.adapter] = (float(value), float(value))
                elif axis.kind == "prompt":
                    cell.prompt = str(value)
                else:
                    cell.seed = int(value)
            line.append(cell)
        grid.append(line)
    return grid


def render(pipe, stack: inference.AdapterStack, specs: list[inference.AdapterSpec], columns: Axis,
           rows: Axis | None, prompt: str, seed: int, progress: bool = False, **generate_kwargs) -> Image.Image:
    """A labelled grid; a weight axis sets an adapter's UNet and text-encoder weights both to the value.
    `progress` shows one bar over the cells on stderr (`sdlora grid`: a large grid takes minutes on a CPU)."""
    cells = [cell for line in plan(columns, rows, prompt, seed, specs) for cell in line]
    images = []
    for cell in tqdm(cells, desc="grid", unit="cell", disable=not progress):
        stack.set_weights({name: cell.weights[index] for index, name in enumerate(stack.names)})
        images += inference.generate(pipe, cell.prompt, seed=cell.seed, **generate_kwargs)
    row_labels = [rows.label(v) for v in rows.values] if rows else None
    return inference.image_grid(images, columns=len(columns.values), row_labels=row_labels,
                                column_labels=[columns.label(v) for v in columns.values])


def axis_from_text(kind: str, values: str, option: str = "--x", adapters: int | None = None) -> Axis:
    """CLI form: kind `weight:N` (adapter number N, in --lora order), `prompt` (values split at `|`) or `seed`.
    `option` (`--x` or `--y`) names the flags in errors; `adapters`, when given, is how many --lora there are."""
    where = f"{option}-values"
    if kind.startswith("weight"):
        _, _, number = kind.partition(":")
        if not (number or "0").isdigit():
            raise GenerationSettingError(f"{option} {kind!r}: N in weight:N is an adapter number: 0 for the first "
                                         "--lora, 1 for the second, ...")
        if adapters is not None and int(number or 0) >= adapters:
            raise GenerationSettingError(f"{option} {kind!r}: there is no adapter {int(number or 0)}; {adapters} "
                                         "--lora given, numbered from 0")
        return Axis("weight", parse_values(values, where), int(number or 0))
    if kind == "prompt":
        prompts = tuple(v.strip() for v in values.split("|") if v.strip())
        if not prompts:
            raise GenerationSettingError(f"{where} {values!r}: give prompts separated by |")
        return Axis("prompt", prompts)
    if kind == "seed":
        return Axis("seed", tuple(int(v) for v in parse_values(values, where)))
    raise GenerationSettingError(f"{option} {kind!r}: use weight:N, prompt or seed")
