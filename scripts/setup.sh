#!/usr/bin/env bash
# Create .venv and install sdlora with the tested versions (CPU torch). Idempotent: a second run is quick.
# GPU users: skip this and run `pip install -e .` in an environment that already has CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch first and pinned: an unpinned torch request would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test,quant]"
