#!/usr/bin/env bash
# Prove sdlora's CUDA paths on one GPU and measure them: what docs/performance-gpu.md was measured with.
#
# On a machine with a CUDA GPU and sdlora's dependencies importable (`pip install -e ".[test,bnb]"`, or the
# packages on PYTHONPATH), from the repository root:
#
#     OUT=gpu-check bash scripts/gpu_check.sh          # the whole list: about 10 minutes on an H200
#
# On the lent machines, install missing packages with `python3 -m pip install --no-deps WHEELS` (their `pip` belongs
# to another Python than `python3`: a lease was lost to that) and run with PYTHONPATH=$PWD instead of installing sdlora.
#
# It writes, under $OUT: env.txt (nvidia-smi, driver, CUDA, torch and package versions), pytest.txt (the output of
# `pytest -m gpu`), results.jsonl (one JSON object per measurement: its name, exact command, exit status, wall time
# and the bench's own JSON result) and failures.txt (the last lines of each failed measurement's stderr). Each measurement runs in its own process
# under its own `timeout`; a failure is recorded and the script goes on. Measurements run in priority order
# (GPU tests; SD3.5 Medium; CLI; batch-1 training rows; generation; batch-4 rows) and stop being started once
# BUDGET_S seconds (default 900) have passed: on a short lease set it lower, and the most important numbers still come
# first. SD3.5 Medium alone: ONLY='sd35m' BUDGET_S=600 OUT=gpu-check bash scripts/gpu_check.sh
# (On the H200 of docs/performance-gpu.md, everything up to the batch-4 rows took 344 s.)
#
# QUICK=1 runs the same list on the tiny layouts at 64 px in seconds: a dry run of this script on a CPU (the
# CUDA-only rows then fail with their own message, which is the point of the dry run: every path is exercised).
# ONLY (an extended regex) runs just the measurements whose names match it, e.g. ONLY='pytest-gpu|cli-' (a second,
# short lease that fills in what the first one missed).
# PYTHON picks the interpreter (default python3). Results are for one process at a time on an otherwise idle GPU:
# the driver's memory reading counts every process on the card.
set -u
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-900}
QUICK=${QUICK:-0}
ONLY=${ONLY:-.}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
DEADLINE=$((SECONDS + BUDGET_S))
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if [ "$QUICK" = 1 ]; then
    SD15=(--arch tiny --resolution 64); SDXL=(--arch tiny-sdxl --resolution 64); SD35M=(--arch tiny-sd3 --resolution 64)
    SD35L=(--arch tiny-sd3 --resolution 64)
    STEPS=(--steps 2 --warmup 1 --no-flops); GEN=(--gen-steps 2 --repeats 2)
else
    SD15=(--arch sd15 --resolution 512); SDXL=(--arch sdxl --resolution 1024)
    SD35M=(--arch sd3.5-medium --resolution 1024); SD35L=(--arch sd3.5-large --resolution 1024)
    STEPS=(--steps 5 --warmup 2 --no-flops); GEN=(--gen-steps 20 --repeats 3)
fi

{
    date -u
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    $PYTHON - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA (torch build)", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| CUDA available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| capability", f"{p.major}.{p.minor}", "| memory", f"{p.total_memory / 2**30:.1f} GiB",
          "| bf16", torch.cuda.is_bf16_supported())
for name in ("sdlora", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "safetensors",
             "tokenizers", "pydantic", "pydantic_core", "pillow", "numpy", "pyyaml", "tqdm", "bitsandbytes",
             "xformers", "optimum-quanto", "pytest"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import sdlora, diffusers, peft, pydantic  # noqa: E401,F401  (fails loudly here, before any measurement)
print("imports ok:", sdlora.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"

# run_item NAME TIMEOUT_S COMMAND...: run one measurement in its own process; record it in results.jsonl.
run_item() {
    local name=$1 limit=$2; shift 2
    [[ "$name" =~ $ONLY ]] || return 0
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: not started, ${left}s of the budget left"
        printf '{"name": "%s", "skipped": "budget"}\n' "$name" >>"$RESULTS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS rc
    timeout -k 10 "$limit" "$@" >"$OUT/.stdout" 2>"$OUT/.stderr"
    rc=$?
    local wall=$((SECONDS - start))
    tail -n 40 "$OUT/.stderr" | grep -v -e '^\s*warnings.warn' -e 'UserWarning' || true
    cat "$OUT/.stdout" | tail -n 30
    NAME=$name RC=$rc WALL=$wall CMD="$*" $PYTHON - "$OUT/.stdout" >>"$RESULTS" <<'EOF'
import json, os, sys
text = open(sys.argv[1]).read().strip().splitlines()
result = None
if text:
    try:
        result = json.loads(text[-1])
    except ValueError:
        result = None
print(json.dumps({"name": os.environ["NAME"], "rc": int(os.environ["RC"]), "wall_s": int(os.environ["WALL"]),
                  "command": os.environ["CMD"], "result": result}))
EOF
    if [ "$rc" != 0 ]; then
        echo "=== $name FAILED (exit $rc after ${wall}s)"
        { echo "===== $name (exit $rc): $*"; tail -n 200 "$OUT/.stderr"; } >>"$OUT/failures.txt"
    else
        echo "=== $name ok (${wall}s)"
    fi
}

# 1. The GPU tests (skipped, not failed, without CUDA).
if [[ pytest-gpu =~ $ONLY ]]; then
    echo "=== pytest -m gpu"
    start=$SECONDS
    # The whole tests/ folder: GPU tests live beside the CPU tests of the same feature (test_offload.py has one).
    timeout -k 10 240 $PYTHON -m pytest -m gpu -v -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -n 60
    printf '{"name": "pytest-gpu", "rc": %d, "wall_s": %d}\n' "${PIPESTATUS[0]}" $((SECONDS - start)) >>"$RESULTS"
fi

B=($PYTHON scripts/bench.py --rank 16 --json "${STEPS[@]}")
SAVE=(--checkpointing --cached --optimizer adamw8bit)

# 2. SD3.5 Medium at 1024 px (issue 21's goal: an nf4-base LoRA in <= 10 GB), first after the tests so that a short
# lease measures it: every saver + nf4 (T5-XXL included, freed after caching like the CLIPs), then plain bf16.
# Drawing the 7.8 B random weights (transformer, T5, CLIPs) happens on the GPU in seconds; most of the time is
# moving them to the CPU and back, as a loaded checkpoint would arrive.
run_item sd35m-nf4-b1 300 "${B[@]}" "${SD35M[@]}" --batch 1 --precision bf16 "${SAVE[@]}" --quantize nf4
run_item sd35m-bf16-b1 240 "${B[@]}" "${SD35M[@]}" --batch 1 --precision bf16
# SD3.5 Large (8.1 B transformer) with every saver + nf4: the card size its users ask about (24 GB is common).
run_item sd35l-nf4-b1 300 "${B[@]}" "${SD35L[@]}" --batch 1 --precision bf16 "${SAVE[@]}" --quantize nf4

# 3. The CLI as a user runs it: train the demo's style LoRA on the shipped base in bf16 and fp16 (with its sample
# prompts), generate with the adapter on the GPU, then the whole offline demo. cli-images then checks every image
# written for black or flat output.
DEMO_STEPS=$([ "$QUICK" = 1 ] && echo 25 || echo 300)
for precision in bf16 fp16; do
    run_item cli-train-$precision 120 $PYTHON -m sdlora train configs/demo-style.yaml train.mixed_precision=$precision \
        train.steps=$DEMO_STEPS output.dir="$OUT/cli-$precision"
done
run_item cli-generate 60 $PYTHON -m sdlora generate --base sdlora:shapes \
    --lora "$OUT/cli-bf16/demo_style.safetensors:0.8" --prompt "a red circle on a blue background, striped style" \
    --steps 25 --guidance-scale 5.0 --num-images 4 -o "$OUT/cli-generate.png"
run_item demo-gpu 240 $PYTHON scripts/demo.py --out "$OUT/demo" $([ "$QUICK" = 1 ] && echo --steps 25)
run_item cli-images 30 $PYTHON scripts/image_check.py "$OUT"

# 4. Batch 1: (a) bf16, (c) every saver + nf4, (b) every saver, (a) fp16 -- SD1.5 at 512 px, SDXL at 1024 px.
run_item sd15-bf16-b1 60 "${B[@]}" "${SD15[@]}" --batch 1 --precision bf16
run_item sdxl-bf16-b1 90 "${B[@]}" "${SDXL[@]}" --batch 1 --precision bf16
run_item sd15-nf4-b1 60 "${B[@]}" "${SD15[@]}" --batch 1 --precision bf16 "${SAVE[@]}" --quantize nf4
run_item sdxl-nf4-b1 120 "${B[@]}" "${SDXL[@]}" --batch 1 --precision bf16 "${SAVE[@]}" --quantize nf4
run_item sd15-fp16-b1 60 "${B[@]}" "${SD15[@]}" --batch 1 --precision fp16
run_item sdxl-fp16-b1 90 "${B[@]}" "${SDXL[@]}" --batch 1 --precision fp16
run_item sd15-savers-b1 60 "${B[@]}" "${SD15[@]}" --batch 1 --precision bf16 "${SAVE[@]}"
run_item sdxl-savers-b1 90 "${B[@]}" "${SDXL[@]}" --batch 1 --precision bf16 "${SAVE[@]}"
run_item sd15-fp16-nf4-b1 60 "${B[@]}" "${SD15[@]}" --batch 1 --precision fp16 "${SAVE[@]}" --quantize nf4
run_item sdxl-fp16-nf4-b1 120 "${B[@]}" "${SDXL[@]}" --batch 1 --precision fp16 "${SAVE[@]}" --quantize nf4

# 5. Generation: base vs two stacked rank-16 adapters, unfused and fused, fp16 pipeline.
G=($PYTHON scripts/bench.py --generate --rank 16 --precision fp16 --json "${GEN[@]}")
run_item gen-sd15-fp16 60 "${G[@]}" "${SD15[@]}"
run_item gen-sdxl-fp16 90 "${G[@]}" "${SDXL[@]}"

# 6. Batch 4.
run_item sd15-bf16-b4 60 "${B[@]}" "${SD15[@]}" --batch 4 --precision bf16
run_item sdxl-bf16-b4 90 "${B[@]}" "${SDXL[@]}" --batch 4 --precision bf16
run_item sd15-nf4-b4 60 "${B[@]}" "${SD15[@]}" --batch 4 --precision bf16 "${SAVE[@]}" --quantize nf4
run_item sdxl-nf4-b4 120 "${B[@]}" "${SDXL[@]}" --batch 4 --precision bf16 "${SAVE[@]}" --quantize nf4
run_item sd15-fp16-b4 60 "${B[@]}" "${SD15[@]}" --batch 4 --precision fp16
run_item sdxl-fp16-b4 90 "${B[@]}" "${SDXL[@]}" --batch 4 --precision fp16
run_item sd15-savers-b4 60 "${B[@]}" "${SD15[@]}" --batch 4 --precision bf16 "${SAVE[@]}"
run_item sdxl-savers-b4 90 "${B[@]}" "${SDXL[@]}" --batch 4 --precision bf16 "${SAVE[@]}"

rm -f "$OUT/.stdout" "$OUT/.stderr"
echo "=== done after ${SECONDS}s; results in $RESULTS"
