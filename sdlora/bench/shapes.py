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
SUBJECT_SHAPE = "ring"  # never in the base's world: the subject LoRA teaches it, with a trigger word
RING_HOLE = 0.5  # the ring's hole radius, as a share of its outer radius (0.6: docs/demo.md, fifth round)
SUBJECT_TRIGGER = "sks"
STYLES = ("plain", "striped", "outline")


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    center: tuple[float, float]  # fractions of the image side
    radius: float  # fraction of the image side
    style: str = "plain"
    # How thick a striped style's stripes are, relative to the usual width (a dial LoRA's pictures vary it).
    stripe_width: float = 1.0

    @property
    def caption(self) -> str:
        noun = f"{SUBJECT_TRIGGER} {self.shape}" if self.shape == SUBJECT_SHAPE else self.shape
        text = f"a {self.color} {noun} on a {self.background} background"
        return text if self.style == "plain" else f"{text}, {self.style} style"


NOT_BLACK = tuple(c for c in COLORS if c != "black")


def random_scene(rng: random.Random, style: str = "plain", shape: str | None = None,
                 colors: tuple[str, ...] | None = None) -> Scene:
    """A random scene; `colors` limits both colours (stripes and outlines are black, so styled sets use
    NOT_BLACK: black-on-black stripes are invisible)."""
    palette = sorted(colors or COLORS)
    color = rng.choice(palette)
    background = rng.choice([c for c in palette if c != color])
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
    elif scene.shape == SUBJECT_SHAPE:
        draw.ellipse(outline, fill=255)
        cx, cy, r = scene.center[0] * size, scene.center[1] * size, scene.radius * size * RING_HOLE
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    elif scene.shape == "square":
        draw.rectangle(outline, fill=255)
    else:
        draw.polygon(outline, fill=255)
    fill = Image.new("RGB", (size, size), COLORS[scene.color])
    if scene.style == "striped":
        # Diagonal black stripes across the shape: a texture the plain world never shows.
        # Coarse enough (period ~ size/5) that a small VAE with 4x downsampling can represent it.
        stripes = ImageDraw.Draw(fill)
        step = max(6, size // 5)
        for offset in range(-size, 2 * size, step):
            if scene.stripe_width == 1.0:
                # The usual stripes, drawn as they always were: the shipped base's VAE learnt these exact pixels.
                stripes.line([(offset, 0), (offset + size, size)], fill=(15, 15, 15), width=max(2, step * 2 // 5))
            else:
                # PIL draws a diagonal line 3, 4 or 5 pixels wide alike, so other widths are parallelograms, a
                # third of the period wide (along a row) times `stripe_width`: the usual stripes' share of the shape.
                width = step / 3 * scene.stripe_width
                stripes.polygon([(offset, 0), (offset + width, 0), (offset + width + size, size),
                                 (offset + size, size)], fill=(15, 15, 15))
    image.paste(fill, mask=mask)
    if scene.style == "outline":
        border = ImageDraw.Draw(image)
        width = max(2, size // 16)
        if scene.shape in ("circle", SUBJECT_SHAPE):
            border.ellipse(outline, outline=(15, 15, 15), width=width)
        elif scene.shape == "square":
            border.rectangle(outline, outline=(15, 15, 15), width=width)
        else:
            border.polygon(outline, outline=(15, 15, 15), width=width)
    return image


# ---------------------------------------------------------------------------------------------------------------
# Reading a picture back: deterministic statistics for prompt adherence, style strength and subject presence.


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # the shape's colour, None if no shape was found
    shape: str | None  # circle / square / triangle / ring
    fill_ratio: float  # shape pixels / bounding-box pixels
    stripe_fraction: float  # near-black pixels inside the shape's box, excluding black scenes


def _nearest_palette(image: Image.Image):
    import numpy as np

    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = ((pixels[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    return names, distance.argmin(-1)


CORNER = 0.2  # a corner region: box pixels whose distances to a box corner (as fractions of its sides) sum below this
CORNER_FULL = 0.3  # a corner region at least this full holds the shape's corner (drawn squares: 1.0, model-drawn 0.54+)
CORNER_EMPTY = 0.1  # and at most this full holds none (a circle's edge passes 0.29 from the corner: 0.0)


def _corner_fill(box) -> tuple[float, float]:
    """Mean fill of the bounding box's two top corner regions and of its two bottom ones."""
    import numpy as np

    h, w = box.shape
    fy, fx = np.mgrid[0:h, 0:w]
    fy, fx = (fy + 0.5) / h, (fx + 0.5) / w
    fills = {}
    for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        region = box[(np.abs(fy - cy) + np.abs(fx - cx)) < CORNER]
        fills[cy, cx] = float(region.mean()) if region.size else 0.0  # a box a few pixels wide has no corner region
    return (fills[0, 0] + fills[0, 1]) / 2, (fills[1, 0] + fills[1, 1]) / 2


def read_scene(image: Image.Image) -> Reading:
    """Background = most common colour on the border; shape colour = most common other non-black colour; shape
    type from where the shape fills its bounding box: a ring has a hollow centre; a square fills the box's four
    corners, an (upright) triangle only the bottom two, a circle none; the fill ratio (circle ~0.79, triangle ~0.5)
    decides a triangle whose base corners came out blunt.

    The corners, not the fill ratio, tell squares from circles: a square a model draws with slightly bowed sides
    fills 0.86-0.90 of its box, a lumpy circle 0.63-0.76, so any fill threshold between them misreads one or the
    other (the fill-only reader called 7 of the shapes base's 20 squares circles); their corners are 0.5-1.0 full
    and empty, respectively (measured on the base's 60 pictures and on drawn shapes)."""
    import numpy as np

    names, labels = _nearest_palette(image)
    border = np.concatenate([labels[:3].ravel(), labels[-3:].ravel(), labels[:, :3].ravel(), labels[:, -3:].ravel()])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    black = names.index("black")
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[background] = 0
    fill_colors = counts.copy()
    fill_colors[black] = 0
    if background != black and counts.argmax() == black and fill_colors.max() >= labels.size * 0.02:
        # Black is the stripe/outline colour: prefer the fill colour when there is one, but a few stray pixels of
        # another colour (edges, noise) do not make a black shape disappear.
        counts[black] = 0
    if counts.max() < labels.size * 0.02:
        return Reading(names[background], None, None, 0.0, 0.0)
    color = int(counts.argmax())
    body = labels == color
    if color != black and background != black:
        body = body | (labels == black)
    ys, xs = np.nonzero(body)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = body[top:bottom, left:right]
    fill = float(box.mean())
    h, w = box.shape
    centre = box[h * 2 // 5 : h * 3 // 5 + 1, w * 2 // 5 : w * 3 // 5 + 1]
    top_corners, bottom_corners = _corner_fill(box)
    if centre.size and centre.mean() < 0.3 and fill > 0.4:
        shape = SUBJECT_SHAPE
    elif min(top_corners, bottom_corners) > CORNER_FULL:
        shape = "square"
    elif bottom_corners > CORNER_FULL and top_corners < CORNER_EMPTY:
        shape = "triangle"
    elif fill > 0.58:
        shape = "circle"
    else:
        shape = "triangle"
    stripes = 0.0
    if color != black and background != black:
        stripes = float((labels[top:bottom, left:right] == black).sum() / max(1, body[top:bottom, left:right].sum()))
    return Reading(names[background], names[color], shape, fill, stripes)
