"""Write the bundled demo datasets into datasets/ (deterministic; re-running reproduces the committed files).

- demo-style:   shapes drawn with diagonal black stripes, captioned "..., striped style" (a look the base never saw)
- demo-style-dial: the same 24 shapes with thinner to the usual stripes, one folder per adapter weight
                (`weight-0.25/` ... `weight-1/`, each with a dataset.toml setting `adapter_weight`): the demo's
                style LoRA trains on it and learns its weight as a dial (thin stripes at 0.25, the usual at 1.0)
- demo-subject: a ring, an object the base never saw, captioned with the trigger word: "a red sks ring on ...",
                once in every colour on every other background (30 pictures), so the ring is tied to `sks` and not
                to the colours it happened to be drawn in
- demo-prior:   plain shapes as the base was trained on them, captioned as the base knows them: regularization
                (prior-preservation) images, so an adapter keeps drawing prompts without its trigger as the base does

    python scripts/make_demo_datasets.py [--out datasets] [--count 24] [--size 64]
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
from dataclasses import replace
from pathlib import Path

from sdlora.bench.shapes import COLORS, NOT_BLACK, SHAPES, SUBJECT_SHAPE, random_scene, render


def write_set(folder: Path, scenes, size: int, skip: list | None = None) -> list[bytes]:
    """Each scene as NNN.png + NNN.txt; `skip[i]`: leave out scene i where its pixels are exactly those bytes.
    Returns every scene's pixels (written or not)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.*"):
        old.unlink()
    drawn = []
    for index, scene in enumerate(scenes):
        picture = render(scene, size)
        drawn.append(picture.tobytes())
        if skip is not None and skip[index] == drawn[-1]:
            continue
        stem = folder / f"{index:03d}"
        picture.save(stem.with_suffix(".png"), optimize=True)
        stem.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")
    return drawn


# adapter weight -> (stripe width relative to the usual stripes, times each picture comes per epoch). The demo's
# style LoRA trains on these. Thin stripes at 0.25 make the style show from 0.25 on; slightly thin ones at 0.75 keep
# 0.75 below the full weight (with the usual stripes there instead, 0.75 striped as many pictures as 1.0, or more);
# the full weight has the usual stripes and most of the batches, so that at 1.0 the adapter is no heavier than the
# style needs (a heavier one fills a stacked subject's ring). docs/demo.md, sixth round, has the levels measured.
# At 64 px the stripes are 2 px wide at 0.5; 0.6 adds a pixel here and there (widths 0.55-0.7 all draw as 0.6).
DIAL = {0.25: (0.5, 1), 0.75: (0.6, 1), 1.0: (1.0, 8)}


def write_dial(folder: Path, scenes, size: int) -> None:
    """One folder per weight; a picture that comes out pixel for pixel as the weight below it is left out (the
    trainer would skip it as a duplicate, with a warning)."""
    shutil.rmtree(folder, ignore_errors=True)  # a level no longer in DIAL must not stay behind
    below: list = [None] * len(scenes)
    for weight, (width, repeats) in DIAL.items():
        level = folder / f"weight-{weight:g}"
        below = write_set(level, [replace(scene, stripe_width=width) for scene in scenes], size, skip=below)
        (level / "dataset.toml").write_text(
            f"# these pictures train the adapter at weight {weight:g} (stripes {width:g}x the usual width)\n"
            f"adapter_weight = {weight}\n" + (f"repeats = {repeats}\n" if repeats > 1 else ""), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("datasets"))
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--prior-count", type=int, default=48)
    args = parser.parse_args()
    rng = random.Random(1)
    style = [random_scene(rng, style="striped", shape=SHAPES[i % 3], colors=NOT_BLACK) for i in range(args.count)]
    write_set(args.out / "demo-style", style, args.size)
    write_dial(args.out / "demo-style-dial", style, args.size)
    rng = random.Random(2)
    # Drawn at random, 24 rings covered 17 of the 30 colour pairs (three of them three times); with every pair
    # once, the subject leaked less on the shipped base (scripts/quality.py, lr 8e-3, 700 steps: shape kept without
    # `sks` 0.79 -> 1.00 on two such sets, rings with it 0.83 -> 0.79 and 0.875; see docs/demo.md).
    pairs = list(itertools.permutations(sorted(COLORS), 2))
    subject = [replace(random_scene(rng, shape=SUBJECT_SHAPE), color=color, background=background)
               for color, background in pairs]
    write_set(args.out / "demo-subject", subject, args.size)
    rng = random.Random(3)
    prior = [random_scene(rng, shape=SHAPES[i % 3]) for i in range(args.prior_count)]
    write_set(args.out / "demo-prior", prior, args.size)
    print(f"wrote {args.count} images to {args.out / 'demo-style'} ({len(DIAL)} levels to "
          f"{args.out / 'demo-style-dial'}), {len(subject)} to {args.out / 'demo-subject'}, "
          f"{args.prior_count} to {args.out / 'demo-prior'}")


if __name__ == "__main__":
    main()
