"""Every PNG under a folder, checked for the failure a broken fp16/bf16 path gives: a black or flat image.

    python scripts/image_check.py FOLDER

Prints one JSON line (each image's mean and standard deviation of its 0-255 pixels) and exits 1 when there is no
image or any is black (mean < 8) or flat (std < 2). scripts/gpu_check.sh runs it on what the GPU run wrote.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rows = []
for path in sorted(root.rglob("*.png")):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    mean, std = float(pixels.mean()), float(pixels.std())
    rows.append({"file": str(path.relative_to(root)), "mean": round(mean, 1), "std": round(std, 1),
                 "black_or_flat": mean < 8 or std < 2})
bad = sum(row["black_or_flat"] for row in rows)
print(json.dumps({"images": len(rows), "black_or_flat": bad, "rows": rows}))
sys.exit(1 if not rows or bad else 0)
