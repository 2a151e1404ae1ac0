"""Time `sdlora dataset check` on a folder of many small images (acceptance: 1,000 images in seconds).

    python scripts/bench_preflight.py [--count 1000] [--size 96]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from sdlora.config import load_config
from sdlora.data.preflight import check, format_table


def write_images(folder: Path, count: int, size: int) -> None:
    rng = random.Random(0)
    for index in range(count):
        width, height = rng.choice([(size, size), (size * 3 // 2, size), (size, size * 3 // 2), (size * 2, size)])
        color = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (width, height), color)
        image.putpixel((index % width, 0), (index % 256, 0, 0))  # every file differs, so no duplicates
        image.save(folder / f"{index:04d}.{'png' if index % 2 else 'jpg'}")
        tags = rng.sample(["red", "blue", "circle", "square", "striped", "dotted", "large", "small"], 3)
        (folder / f"{index:04d}.txt").write_text(", ".join(tags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_images(folder, args.count, args.size)
        config = load_config(None, [f"data.path={folder}", "data.resolution=128", "data.bucketing.enabled=true", "data.bucketing.step=32",
                                    "train.batch_size=4"])
        start = time.perf_counter()
        report = check(config.data, config.train.batch_size)
        elapsed = time.perf_counter() - start
        print(format_table(report, top_tags=5))
        print(f"\nchecked {report.found} images in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
