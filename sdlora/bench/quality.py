"""Deterministic quality measures on the shapes world: does the base follow prompts, does a style LoRA add its
style (and keep the content), does a subject LoRA add its object, do both show when stacked.

Every number comes from reading generated pictures back with `shapes.read_scene` (nearest-palette colours,
bounding-box fill ratio, black pixels inside the shape), over fixed prompts and seeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sdlora import inference
from sdlora.bench.shapes import (
    NOT_BLACK,
    SHAPES,
    SUBJECT_SHAPE,
    SUBJECT_TRIGGER,
    read_scene,
)

STRIPED_THRESHOLD = 0.15  # share of black pixels inside the shape's box above which a picture reads as striped


@dataclass(frozen=True)
class Prompt:
    text: str
    color: str
    background: str
    shape: str


def base_prompts(limit: int = 30) -> list[Prompt]:
    """Every ordered (colour, background) pair once, shapes cycling through them (fixed order)."""
    pairs = list(itertools.permutations(sorted(NOT_BLACK + ("black",)), 2))[:limit]
    return [
        Prompt(f"a {c} {SHAPES[i % 3]} on a {b} background", c, b, SHAPES[i % 3]) for i, (c, b) in enumerate(pairs)
    ]


def styled_prompts(limit: int = 12, subject: bool = False, style: bool = True) -> list[Prompt]:
    """Prompts without black (stripes are black), with the style suffix and/or the subject trigger."""
    combos = [(c, b) for c, b in itertools.permutations(NOT_BLACK, 2)]
    step = max(1, len(combos) // limit)
    prompts = []
    for number, (color, background) in enumerate(combos[::step][:limit]):
        shape = SUBJECT_SHAPE if subject else SHAPES[number % 3]
        noun = f"{SUBJECT_TRIGGER} {SUBJECT_SHAPE}" if subject else shape
        text = f"a {color} {noun} on a {background} background" + (", striped style" if style else "")
        prompts.append(Prompt(text, color, background, shape))
    return prompts


@dataclass
class Scores:
    n: int = 0
    color: int = 0
    background: int = 0
    shape: int = 0
    striped: int = 0
    stripe_sum: float = 0.0

    def add(self, prompt: Prompt, image) -> None:
        reading = read_scene(image)
        self.n += 1
        self.color += reading.color == prompt.color
        self.background += reading.background == prompt.background
        self.shape += reading.shape == prompt.shape
        self.striped += reading.stripe_fraction > STRIPED_THRESHOLD
        self.stripe_sum += reading.stripe_fraction

    def rate(self, field: str) -> float:
        return getattr(self, field) / max(1, self.n)

    @property
    def mean_stripes(self) -> float:
        return self.stripe_sum / max(1, self.n)


def score(pipe, prompts: list[Prompt], seeds=(0, 1), steps: int = 25, guidance_scale: float = 5.0) -> Scores:
    scores = Scores()
    for prompt in prompts:
        for seed in seeds:
            image = inference.generate(pipe, prompt.text, seed=seed, steps=steps, guidance_scale=guidance_scale)[0]
            scores.add(prompt, image)
    return scores


def quality_report(base: str, style_path: str, subject_path: str, seeds=(0, 1), steps: int = 25) -> dict:
    """All four measures; a dict of named numbers (scripts/quality.py prints it; the slow test asserts on it)."""
    from sdlora.hostmem import settle_host_memory
    from sdlora.models import load_base_model

    pipe = inference.build_pipeline(load_base_model(base))
    settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
    stack = inference.stack_adapters(
        pipe, [inference.AdapterSpec(style_path, 0.0), inference.AdapterSpec(subject_path, 0.0)]
    )
    style_name, subject_name = stack.names

    def weights(style: float, subject: float) -> None:
        stack.set_weights({style_name: (style, style), subject_name: (subject, subject)})

    report: dict[str, float] = {}
    weights(0.0, 0.0)
    adherence = score(pipe, base_prompts(), seeds, steps)
    report.update(base_color=adherence.rate("color"), base_background=adherence.rate("background"),
                  base_shape=adherence.rate("shape"))
    for weight in (0.0, 0.5, 1.0):
        weights(weight, 0.0)
        styled = score(pipe, styled_prompts(), seeds, steps)
        report[f"style_{weight:g}_stripes"] = styled.mean_stripes
        report[f"style_{weight:g}_striped"] = styled.rate("striped")
        if weight == 1.0:
            report["style_1_color_kept"] = styled.rate("color")
            report["style_1_background_kept"] = styled.rate("background")
    for weight in (0.0, 1.0):
        weights(0.0, weight)
        report[f"subject_{weight:g}_ring"] = score(pipe, styled_prompts(subject=True, style=False), seeds, steps).rate("shape")
    weights(1.0, 1.0)
    both = score(pipe, styled_prompts(subject=True, style=True), seeds, steps)
    report["stacked_ring"] = both.rate("shape")
    report["stacked_striped"] = both.rate("striped")
    return report
