"""One training run: setup (`run.py`), the loop (`loop.py`), diffusion maths, the optimizer, checkpoints and
resuming, the divergence guard, signals, the output-folder lock, the step log, distribution and offloading."""

