#!/usr/bin/env bash
# Create .venv and install sdlora with the tested versions (CPU torch). Idempotent: a second run is quick.
# GPU users: skip this and run `pip install -e .` in an environment that already has CUDA torch.
# pip's own output and progress bars are shown: a first install downloads for a few minutes.
#   bash scripts/setup.sh          sdlora and what it needs (the demo, your own training)
#   bash scripts/setup.sh --test   + what the tests need: pytest, the optional extras they exercise, and Debian's
#                                  chromium for the web UI's browser test (as root, where apt is at hand)
set -euo pipefail
cd "$(dirname "$0")/.."
pip_install() { .venv/bin/python -m pip install --progress-bar on --disable-pip-version-check -c constraints.txt "$@"; }
echo "setup.sh [1/3] creating .venv"
python3 -m venv .venv
# torch first and pinned: an unpinned torch request would pull a multi-GB CUDA build.
echo "setup.sh [2/3] installing torch 2.13.0 (CPU build, the largest download)"
pip_install torch==2.13.0
echo "setup.sh [3/3] installing sdlora and its tested dependencies (diffusers, transformers, peft, ...)"
if [ "${1:-}" != "--test" ]; then
  pip_install -e .
  echo "setup.sh: done"
  exit 0
fi
pip_install -e ".[test,quant,optimizers,ui-test]"
# The web UI's browser test drives Debian's chromium through playwright (never `playwright install`, which downloads
# a browser build from outside the package registries). Installed only where apt and root are at hand; elsewhere that
# test skips and says why.
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup.sh: installing Debian's chromium for the web UI's browser test"
  (apt-get update && apt-get install -y --no-install-recommends chromium) \
    || echo "setup.sh: chromium could not be installed; the browser test will skip"
fi
echo "setup.sh: done"
