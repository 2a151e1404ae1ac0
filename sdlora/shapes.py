"""A procedurally generated captioned world: coloured shapes on coloured backgrounds.

It feeds the bundled demo datasets (a style set drawn in a style of its own, a subject set with a trigger word)
and is simple enough that image statistics can check whether generated pictures match their prompts.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
STYLES = ("plain", "striped", "outline")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    center: tuple[float, float]  # fractions of the image side
    radius: float  # fraction of the image side
    style: str = "plain"

    @property
    def caption(self) -> str:
        text = f"a {self.color} {self.shape} on a {self.background} background"
        return text if self.style == "plain" else f"{text}, {self.style} style"


def random_scene(rng: random.Random, style: str = "plain", shape: str | None = None) -> Scene:
    color, background = rng.sample(sorted(COLORS), 2)
    return Scene(
        shape=shape or rng.choice(SHAPES),
        color=color,
        background=background,
        center=(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)),
        radius=rng.uniform(0.2, 0.3),
        style=style,
    )


def _outline(scene: Scene, size: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    cx, cy, r = scene.center[0] * size, scene.center[1] * size, scene.radius * size
    if scene.shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return (cx - r, cy - r, cx + r, cy + r)


def render(scene: Scene, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), COLORS[scene.background])
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(scene, size)
    if scene.shape == "circle":
        draw.ellipse(outline, fill=255)
    elif scene.shape == "square":
        draw.rectangle(outline, fill=255)
    else:
        draw.polygon(outline, fill=255)
    fill = Image.new("RGB", (size, size), COLORS[scene.color])
    if scene.style == "striped":
        # Diagonal black stripes across the shape: a texture the plain world never shows.
        stripes = ImageDraw.Draw(fill)
        step = max(4, size // 8)
        for offset in range(-size, 2 * size, step):
            stripes.line([(offset, 0), (offset + size, size)], fill=(15, 15, 15), width=max(1, step // 3))
    image.paste(fill, mask=mask)
    if scene.style == "outline":
        border = ImageDraw.Draw(image)
        width = max(2, size // 16)
        if scene.shape == "circle":
            border.ellipse(outline, outline=(15, 15, 15), width=width)
        elif scene.shape == "square":
            border.rectangle(outline, outline=(15, 15, 15), width=width)
        else:
            border.polygon(outline, outline=(15, 15, 15), width=width)
    return image
