"""Labelled image grids over adapter weights, prompts or seeds: how people pick the weight of a LoRA.

Each cell is rendered by `inference.generate` with the stack's weights set for that cell, so a cell has the same
pixels as a separate `sdlora generate` call with those settings; `image_grid` pastes cells unscaled, with labels
laid out so that none overlaps another (it also lays out the sample grids of a training run).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from sdlora import inference
from sdlora.inference.pipeline import GenerationSettingError


@dataclass(frozen=True)
class Axis:
    """One grid axis: `kind` is 'weight' (of adapter number `adapter`), 'prompt' or 'seed'."""

    kind: str
    values: tuple
    adapter: int = 0

    def label(self, value, names: list[str] | None = None) -> str:
        """A weight reads `NAME WEIGHT` (`names`: what each adapter is called, in --lora order), else the value."""
        if self.kind == "weight":
            name = names[self.adapter] if names and self.adapter < len(names) else f"adapter {self.adapter}"
            return f"{name} {float(value):g}"
        return str(value)


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
    names = [spec.name for spec in specs]
    row_labels = [rows.label(v, names)[:24] for v in rows.values] if rows else None
    return image_grid(images, columns=len(columns.values), row_labels=row_labels,
                      column_labels=[columns.label(v, names) for v in columns.values])


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


LABEL_LINES = 3  # a column label wraps to at most this many lines; a longer one ends in "..."


@dataclass(frozen=True)
class GridLayout:
    """Where `image_grid` puts things: the grid's size, each cell's top-left corner, and each label line with its
    top-left corner (labels sit in the left and top margins, sized to them)."""

    size: tuple[int, int]
    cells: list[tuple[int, int]]
    labels: list[tuple[tuple[int, int], str]]


def _wrap(text: str, font, width: float, max_lines: int = LABEL_LINES) -> list[str]:
    """`text` in lines no wider than `width` pixels, broken at spaces (inside a word only when it alone is wider)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and font.getlength(word) > width:
            cut = max(1, sum(1 for end in range(1, len(word)) if font.getlength(word[:end]) <= width))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines = [*lines[:max_lines - 1], last.rstrip() + "..."]
    return lines


def grid_layout(count: int, columns: int, cell: tuple[int, int], font, row_labels: list[str] | None = None,
                column_labels: list[str] | None = None) -> GridLayout:
    """Margins sized to the labels: column labels wrap to their cell's width (so neighbours never overlap) under
    one another; row labels sit left of their row, the margin as wide as the widest."""
    width, height = cell
    line_height = font.getbbox("Agjy|")[3] + 2
    wrapped = [_wrap(label, font, width - 4) for label in column_labels or []]
    left = 8 + max((int(font.getlength(label)) for label in row_labels or []), default=-8)
    top = 4 + line_height * max((len(lines) for lines in wrapped), default=0) if column_labels else 0
    rows = (count + columns - 1) // columns
    cells = [(left + (n % columns) * width, top + (n // columns) * height) for n in range(count)]
    labels = [((left + column * width + 2, 2 + number * line_height), line)
              for column, lines in enumerate(wrapped) for number, line in enumerate(lines)]
    labels += [((2, top + row * height + (height - line_height) // 2), label)
               for row, label in enumerate(row_labels or [])]
    return GridLayout((left + columns * width, top + rows * height), cells, labels)


def image_grid(images: list[Image.Image], columns: int, row_labels: list[str] | None = None,
               column_labels: list[str] | None = None) -> Image.Image:
    """A labelled grid; cells are pasted unscaled so each cell's pixels equal the image's."""
    font = ImageFont.load_default()
    layout = grid_layout(len(images), columns, images[0].size, font, row_labels, column_labels)
    grid = Image.new("RGB", layout.size, "white")
    for image, corner in zip(images, layout.cells):
        grid.paste(image, corner)
    draw = ImageDraw.Draw(grid)
    for corner, text in layout.labels:
        draw.text(corner, text, fill="black", font=font)
    return grid
