"""Measure the shapes base and the demo LoRAs: prompt adherence, style strength by weight, content kept under the
style (per picture), subject presence, the subject's leak into prompts without its trigger, both effects when
stacked, and each tile of the demo's grid. Deterministic (fixed prompts and seeds); prints a table.
Names: `base_*`; `style_<weight>_*`; `subject_<weight>_ring`; every measure of an adapter on prompts without its
trigger has `leak` in its name; `stacked_*`; `grid_<row>_<column>_ok` and `sweep_<weight>_stripes` for the demo's
pictures (sdlora/bench/quality.py says what each one counts).

    python scripts/quality.py --style runs/demo/style/demo_style.safetensors \
                              --subject runs/demo/subject/demo_subject.safetensors
"""

from __future__ import annotations

import argparse
import json

from sdlora.bench.quality import quality_report

CHANCE = {"base_color": 1 / 6, "base_background": 1 / 5, "base_shape": 1 / 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="sdlora:shapes")
    parser.add_argument("--style", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu", help="where to generate (cpu, cuda)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = quality_report(args.base, args.style, args.subject, seeds=tuple(range(args.seeds)), steps=args.steps,
                            device=args.device)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'measure':40} {'value':>8} {'chance':>8}")
    for name, value in report.items():
        chance = f"{CHANCE[name]:.2f}" if name in CHANCE else ""
        print(f"{name:40} {value:8.3f} {chance:>8}")


if __name__ == "__main__":
    main()
