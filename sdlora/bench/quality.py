"""Deterministic quality measures on the shapes world: does the base follow prompts, does a style LoRA add its
style (and keep each picture's content), does a subject LoRA add its object only where its trigger word asks for
it, do both show when stacked, and what does each picture of the demo's grid show.

Every number comes from reading generated pictures back with `shapes.read_scene` (nearest-palette colours,
bounding-box fill ratio, black pixels inside the shape), over fixed prompts and seeds. Measures that compare an
adapter's picture with the base's compare the same prompt and seed, picture by picture: an average can hide a
style that stripes half the pictures and wrecks the other half, or a subject that turns every prompt into its ring.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sdlora import inference
from sdlora.bench.shapes import NOT_BLACK, SHAPES, SUBJECT_SHAPE, SUBJECT_TRIGGER, Reading, read_scene

STRIPED_THRESHOLD = 0.15  # share of black pixels inside the shape's box above which a picture reads as striped
STYLE_SUFFIX = ", striped style"
STYLE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The demo's pictures (scripts/demo.py draws exactly these): content the base was trained on, one seed.
GRID_ROWS = (("yellow", "square", "green"), ("red", "circle", "blue"), ("white", "triangle", "red"))
GRID_SEED = 3
# (key, title, style weight, subject weight, prompt kind): the subject without its trigger shows whether it leaks.
GRID_COLUMNS = (
    ("base", "base", 0.0, 0.0, "plain"),
    ("style_1", "style 1.0", 1.0, 0.0, "style"),
    ("subject_1_leak", "subject 1.0, no sks", 0.0, 1.0, "plain"),
    ("subject_1", "subject 1.0", 0.0, 1.0, "subject"),
    ("stacked", "style 1.0 + subject 1.0", 1.0, 1.0, "both"),
)


@dataclass(frozen=True)
class Prompt:
    text: str
    color: str
    background: str
    shape: str


def make_prompt(color: str, shape: str, background: str, kind: str = "plain") -> Prompt:
    """kind: plain (the base's own captions), style (+ the style suffix), subject (the trigger and its ring instead
    of the shape), both."""
    subject = kind in ("subject", "both")
    noun = f"{SUBJECT_TRIGGER} {SUBJECT_SHAPE}" if subject else shape
    text = f"a {color} {noun} on a {background} background" + (STYLE_SUFFIX if kind in ("style", "both") else "")
    return Prompt(text, color, background, SUBJECT_SHAPE if subject else shape)


def base_prompts(limit: int = 30) -> list[Prompt]:
    """Every ordered (colour, background) pair once, shapes cycling through them (fixed order)."""
    pairs = list(itertools.permutations(sorted(NOT_BLACK + ("black",)), 2))[:limit]
    return [make_prompt(c, SHAPES[i % 3], b) for i, (c, b) in enumerate(pairs)]


def styled_prompts(limit: int = 12, subject: bool = False, style: bool = True) -> list[Prompt]:
    """Prompts without black (stripes are black), with the style suffix and/or the subject trigger."""
    combos = list(itertools.permutations(NOT_BLACK, 2))
    step = max(1, len(combos) // limit)
    kind = {(False, False): "plain", (False, True): "style", (True, False): "subject", (True, True): "both"}
    return [make_prompt(c, SHAPES[n % 3], b, kind[subject, style]) for n, (c, b) in enumerate(combos[::step][:limit])]


def grid_prompt(row: tuple[str, str, str], kind: str) -> Prompt:
    return make_prompt(*row, kind)


# -- measures on pictures (pure: the unit tests feed them drawn pictures) ------------------------------------------


def is_striped(reading: Reading) -> bool:
    return reading.stripe_fraction > STRIPED_THRESHOLD


def content_right(prompt: Prompt, reading: Reading) -> bool:
    return (reading.color, reading.background, reading.shape) == (prompt.color, prompt.background, prompt.shape)


def adherence(prompts: list[Prompt], readings: list[Reading]) -> dict[str, float]:
    """Share of pictures whose colour / background / shape match their prompt; ring and striped shares; the mean
    stripe fraction."""
    n = max(1, len(readings))
    pairs = list(zip(prompts, readings))
    return {
        "color": sum(r.color == p.color for p, r in pairs) / n,
        "background": sum(r.background == p.background for p, r in pairs) / n,
        "shape": sum(r.shape == p.shape for p, r in pairs) / n,
        "ring": sum(r.shape == SUBJECT_SHAPE for r in readings) / n,
        "striped": sum(is_striped(r) for r in readings) / n,
        "stripes": sum(r.stripe_fraction for r in readings) / n,
    }


def style_damage(prompts: list[Prompt], base: list[Reading], styled: list[Reading]) -> dict[str, float]:
    """Per picture, against the base's picture of the same prompt and seed: among the pictures the base drew right
    (colour, background and shape), the share the style keeps right (`content_kept`), and the share of all pictures
    that the style left both right and striped (`right_and_striped`: style on every shape, content on every one)."""
    drawn_right = [i for i, (p, r) in enumerate(zip(prompts, base)) if content_right(p, r)]
    kept = sum(content_right(prompts[i], styled[i]) for i in drawn_right)
    both = sum(content_right(p, r) and is_striped(r) for p, r in zip(prompts, styled))
    return {"content_kept": kept / max(1, len(drawn_right)), "right_and_striped": both / max(1, len(styled))}


def pixel_change(before, after) -> float:
    """Mean absolute difference of two pictures, 0 (same) .. 1 (black to white everywhere)."""
    a = np.asarray(before.convert("RGB"), dtype=np.float32)
    b = np.asarray(after.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255.0)


def leak(base_images, adapter_images) -> dict[str, float]:
    """An adapter applied to prompts without its trigger, picture by picture against the base's: rings drawn
    (`ring`), shape reading kept from the base's picture (`shape_kept`), any reading (colour, background, shape,
    striped) changed (`changed`), and the mean pixel change (`pixels`)."""
    base = [read_scene(im) for im in base_images]
    after = [read_scene(im) for im in adapter_images]

    def summary(r: Reading):
        return r.color, r.background, r.shape, is_striped(r)

    n = max(1, len(after))
    return {
        "ring": sum(r.shape == SUBJECT_SHAPE for r in after) / n,
        "shape_kept": sum(a.shape == b.shape for a, b in zip(after, base)) / n,
        "changed": sum(summary(a) != summary(b) for a, b in zip(after, base)) / n,
        "pixels": sum(pixel_change(b, a) for b, a in zip(base_images, adapter_images)) / n,
    }


def tile_ok(column_kind: str, prompt: Prompt, reading: Reading, base_reading: Reading | None = None) -> bool:
    """What a grid tile should show: the prompt's content; striped where the style is asked for; the ring where
    the trigger is; for the subject without its trigger, the base's own picture (same reading, no ring)."""
    if column_kind == "leak":
        return base_reading is not None and reading.shape != SUBJECT_SHAPE and (
            reading.color, reading.background, reading.shape) == (
            base_reading.color, base_reading.background, base_reading.shape)
    striped_wanted = column_kind in ("style", "both")
    return content_right(prompt, reading) and is_striped(reading) == striped_wanted


# -- generating and reporting --------------------------------------------------------------------------------------


def render(pipe, prompts: list[Prompt], seeds=(0, 1), steps: int = 25, guidance_scale: float = 5.0) -> tuple[list, list]:
    """Pictures for every (prompt, seed), prompt-major; returns (pictures, the prompt of each picture). Each seed's
    prompts are drawn as one batch, every picture from its own generator: the same starting noise as one
    `inference.generate` call per picture (the pictures agree up to float summation order), about 1.7x faster."""
    import torch

    from sdlora import rng

    by_seed = []
    with rng.isolated(), torch.no_grad():
        for seed in seeds:
            generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]
            by_seed.append(pipe([p.text for p in prompts], num_inference_steps=steps, guidance_scale=guidance_scale,
                                generator=generators, output_type="pil").images)
    images = [by_seed[s][i] for i in range(len(prompts)) for s in range(len(seeds))]
    order = [prompt for prompt in prompts for _ in seeds]
    return images, order


def quality_report(base: str, style_path: str, subject_path: str, seeds=(0, 1), steps: int = 25,
                   device: str = "cpu") -> dict:
    """Every measure; a dict of named numbers (scripts/quality.py prints it; the slow test asserts on it). The
    starting noise is drawn on the CPU, so another device gives the same numbers up to float rounding."""
    from sdlora.hostmem import settle_host_memory
    from sdlora.models import load_base_model

    pipe = inference.build_pipeline(load_base_model(base), device=device)
    settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
    stack = inference.stack_adapters(
        pipe, [inference.AdapterSpec(style_path, 0.0), inference.AdapterSpec(subject_path, 0.0)]
    )
    style_name, subject_name = stack.names

    def pictures(style: float, subject: float, prompts: list[Prompt], these_seeds=seeds):
        stack.set_weights({style_name: (style, style), subject_name: (subject, subject)})
        images, order = render(pipe, prompts, these_seeds, steps)
        return images, order, [read_scene(im) for im in images]

    report: dict[str, float] = {}
    _, order, readings = pictures(0.0, 0.0, base_prompts())
    rates = adherence(order, readings)
    report.update(base_color=rates["color"], base_background=rates["background"], base_shape=rates["shape"])

    styled = {}
    for weight in STYLE_WEIGHTS:
        _, order, styled[weight] = pictures(weight, 0.0, styled_prompts())
        rates = adherence(order, styled[weight])
        report[f"style_{weight:g}_stripes"] = rates["stripes"]
        report[f"style_{weight:g}_striped"] = rates["striped"]
        if weight in (0.0, 1.0):  # the base's own rates on these prompts: what "kept" is measured against
            tag = "kept" if weight else ""
            for field in ("color", "background", "shape"):
                report[f"style_{weight:g}_{field}" + (f"_{tag}" if tag else "")] = rates[field]
    damage = style_damage(order, styled[0.0], styled[1.0])
    report["style_1_content_kept"] = damage["content_kept"]
    report["style_1_right_and_striped"] = damage["right_and_striped"]

    for weight in (0.0, 1.0):
        _, order, readings = pictures(0.0, weight, styled_prompts(subject=True, style=False))
        report[f"subject_{weight:g}_ring"] = adherence(order, readings)["ring"]
    plain = styled_prompts(style=False)
    base_images, _, _ = pictures(0.0, 0.0, plain)
    subject_images, _, _ = pictures(0.0, 1.0, plain)
    report.update({f"subject_1_leak_{k}": v for k, v in leak(base_images, subject_images).items()})

    _, order, readings = pictures(1.0, 1.0, styled_prompts(subject=True, style=True))
    rates = adherence(order, readings)
    report.update(stacked_ring=rates["ring"], stacked_striped=rates["striped"],
                  stacked_color_kept=rates["color"], stacked_background_kept=rates["background"])
    _, _, readings = pictures(1.0, 1.0, styled_prompts())
    report["stacked_leak_ring"] = adherence(styled_prompts(), readings)["ring"]
    report.update(grid_report(pictures))
    return report


def grid_report(pictures) -> dict[str, float]:
    """Per tile of the demo grid (its prompts and seed): 1.0 when the tile shows what `tile_ok` asks for; and the
    stripe fraction along the demo's style sweep (first row, style weights 0 -> 1)."""
    report = {}
    for row in GRID_ROWS:
        base_reading = None
        for key, _, style, subject, kind in GRID_COLUMNS:
            prompt = grid_prompt(row, kind)
            _, _, (reading,) = pictures(style, subject, [prompt], (GRID_SEED,))
            if key == "base":
                base_reading = reading
            ok = tile_ok("leak" if key.endswith("leak") else kind, prompt, reading, base_reading)
            report[f"grid_{row[0]}_{row[1]}_{key}_ok"] = float(ok)
    sweep = grid_prompt(GRID_ROWS[0], "style")
    for weight in STYLE_WEIGHTS:
        _, _, (reading,) = pictures(weight, 0.0, [sweep], (GRID_SEED,))
        report[f"sweep_{weight:g}_stripes"] = reading.stripe_fraction
    return report
