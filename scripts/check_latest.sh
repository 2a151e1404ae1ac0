#!/usr/bin/env bash
# Does sdlora still work with the newest releases pyproject.toml allows? constraints.txt is the tested set, but a
# bare `pip install -e .` (every GPU user's install) takes whatever is newest, so this makes a fresh venv in a temp
# folder, installs the CPU torch wheel (the one pin, as scripts/setup.sh does) and then sdlora with no constraints
# file, prints the versions pip chose, and on the tiny SD1 and SDXL bases (built offline) trains a UNet +
# text-encoder LoRA and generates with it stacked on a kohya file that has text-encoder weights: the paths a
# peft/transformers/diffusers release has broken before. Exits 0 only if all of that works.
#   scripts/check_latest.sh          # needs PyPI; a few minutes to install, then about 3 minutes on 2 CPU cores
#   KEEP=1 scripts/check_latest.sh   # keep the temp folder (venv, adapters, images) and print its path
set -Eeuo pipefail
trap 'echo "check_latest: FAILED at line $LINENO" >&2' ERR
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/sdlora-check-latest.XXXXXX")"
if [[ "${KEEP:-0}" == 1 ]]; then echo "keeping $work"; else trap 'rm -rf "$work"' EXIT; fi
python="${PYTHON:-python3}"

"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned, as scripts/setup.sh does: an unpinned torch request would pull a multi-GB CUDA build.
# Everything else is unconstrained: no -c constraints.txt, so pip takes the newest releases the bounds allow.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e "$repo[test]"
installed=$SECONDS
"$work/venv/bin/python" - <<'EOF'
from importlib.metadata import version
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub"):
    print(f"{name}=={version(name)}")
EOF

sdlora="$work/venv/bin/sdlora"
cd "$work"
export SDLORA_CACHE="$work/cache" HF_HUB_OFFLINE=1  # the tiny base is built here, offline; nothing is downloaded

# One family: train a UNet + text-encoder LoRA (every text encoder of the base: SDXL's two) for a few steps on the
# bundled striped-shapes images, convert it to kohya's layout (lora_te* keys, what kohya, A1111 and ComfyUI write),
# then generate with both stacked, each with its own UNet and text-encoder weight.
check() {
  local base="$1" name="$2" steps="$3"
  cat > "$work/$name.yaml" <<EOF
model: {base: "$base"}
data: {path: "$repo/datasets/demo-style", resolution: 64}
lora: {rank: 4, alpha: 4, train_text_encoder: true}
train: {steps: $steps, batch_size: 2, learning_rate: 1.0e-3, seed: 0}
output: {dir: "$work/$name", name: $name}
EOF
  "$sdlora" train "$work/$name.yaml"
  local adapter="$work/$name/$name.safetensors" kohya="$work/${name}_kohya.safetensors"
  "$sdlora" convert "$adapter" "$kohya" --to kohya
  "$work/venv/bin/python" - "$kohya" <<'EOF'
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    te = [k for k in f.keys() if k.startswith("lora_te")]
assert te, f"{sys.argv[1]} has no text-encoder weights: the check would not exercise them"
print(f"{sys.argv[1]}: {len(te)} text-encoder tensors")
EOF
  "$sdlora" generate --base "$base" --lora "$adapter:0.8" --lora "$kohya:0.5:0.7" \
    --prompt "a red circle on a blue background, striped style" --steps 4 --height 64 --width 64 -o "$work/$name.png"
  test -s "$work/$name.png"
  echo "check_latest: $base OK"
}
check sdlora:tiny sd1 4
check sdlora:tiny-sdxl sdxl 2
echo "check_latest: OK (install ${installed} s, checks $((SECONDS - installed)) s)"
