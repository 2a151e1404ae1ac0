"""Write the bundled demo datasets into datasets/ (deterministic; re-running reproduces the committed files).

    python scripts/make_demo_datasets.py [--out datasets] [--count 16] [--size 64]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from sdlora.shapes import random_scene, render


def write_set(folder: Path, style: str, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = random_scene(rng, style=style)
        stem = folder / f"{index:03d}"
        render(scene, size).save(stem.with_suffix(".png"), optimize=True)
        stem.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("datasets"))
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    write_set(args.out / "demo-style", "striped", args.count, args.size, seed=1)
    print(f"wrote {args.count} images to {args.out / 'demo-style'}")


if __name__ == "__main__":
    main()
