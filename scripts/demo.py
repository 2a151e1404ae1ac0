"""The offline demo: on the shipped `sdlora:shapes` base, train a style LoRA (stripes) and a subject LoRA (a
ring with the trigger word "sks") on CPU, then draw two pictures: demo_grid.png (three prompts the base was trained
on, by column: base / style / subject without its trigger / subject / both stacked) and demo_sweep.png (one prompt,
the style weight 0 -> 1). Everything it needs ships with sdlora; nothing is downloaded.

    python scripts/demo.py [--out runs/demo] [--steps N] [--fresh]

Ctrl-C or SIGTERM stops the demo: a training in progress finishes its step and writes a checkpoint, then the demo
exits (status 75) without starting the next training or drawing a grid from a half-trained adapter. Running the
same command again resumes where it stopped; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from sdlora import inference
from sdlora.bench.quality import GRID_COLUMNS, GRID_ROWS, GRID_SEED, STYLE_WEIGHTS, grid_prompt
from sdlora.config import load_config, read_config_file
from sdlora.errors import UserError
from sdlora.hostmem import settle_host_memory
from sdlora.models import load_base_model
from sdlora.training.checkpoint import latest_checkpoint
from sdlora.training.interrupt import EXIT_ABORTED, EXIT_STOPPED

ROOT = Path(__file__).resolve().parents[1]


class Stopped(Exception):
    """The user asked the demo to stop (Ctrl-C / SIGTERM)."""


def _stop_now(signum: int, frame) -> None:
    # Outside the trainings (loading, drawing the grid) nothing is worth finishing: stop at once. While the trainings
    # run, `Trainings` forwards the signal to them instead (each finishes its step and checkpoints).
    raise Stopped(signal.Signals(signum).name)


def adapter_command(name: str, out: Path, steps: int | None, fresh: bool) -> list[str]:
    """`sdlora train` for one demo adapter, resuming from its latest checkpoint when an earlier demo was stopped.
    The demo configs checkpoint every 100 steps and at the end, so a re-run of a finished demo trains nothing."""
    config_path = ROOT / "configs" / f"demo-{name}.yaml"
    # No sample pictures during training: the demo draws its own pictures from the finished adapters.
    overrides = [data_override(config_path, name), f"output.dir={out / name}", "sample.prompts=[]"]
    if steps:  # a shortened run keeps the warmup a small part of it (the configs warm up for 20 steps)
        overrides += [f"train.steps={steps}", f"train.lr_warmup_steps={min(20, steps // 5)}"]
    load_config(config_path, overrides)  # a bad config or dataset path fails here, in this process, in one line
    # Without a checkpoint the folder holds nothing resumable (at most an adapter of a run stopped before its
    # first step): start over there. A checkpoint of other settings (another --steps) is refused with one line.
    resume = not fresh and latest_checkpoint(out / name / "checkpoints") is not None
    return [sys.executable, "-m", "sdlora", "train", str(config_path), *overrides,
            *(["--resume", "latest"] if resume else ["--overwrite"])]


class Trainings:
    """The two adapters train at the same time, one process each. The demo's model is so small that a second
    thread barely speeds a training up (measured: 150 steps of the subject in 69 s on one thread and on two), so
    two one-thread processes on two cores take the time of the longer one instead of the sum.

    Each child's log goes to <out>/<name>/train.log and its progress to a bar here; its INFO and WARNING lines are
    echoed with the adapter's name. Ctrl-C / SIGTERM reaches the children only through this process (they run in
    their own session), so each gets exactly one stop request: finish the step, checkpoint, exit 75."""

    def __init__(self, commands: dict[str, list[str]], out: Path) -> None:
        threads = str(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
                              os.cpu_count() or 1) // len(commands)))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.stopped_by: str | None = None  # the signal the user sent
        self.failed = False  # a training failed and the others were stopped
        self.children: dict[str, subprocess.Popen] = {}
        self.bars = {name: tqdm(desc=f"{name:7}", position=row, unit="step", dynamic_ncols=True)
                     for row, name in enumerate(commands)}
        self.readers = []
        for name, command in commands.items():
            (out / name).mkdir(parents=True, exist_ok=True)
            child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            self.children[name] = child
            reader = threading.Thread(target=self._follow, args=(name, child, out / name / "train.log"), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _follow(self, name: str, child: subprocess.Popen, log_path: Path) -> None:
        bar = self.bars[name]
        with open(log_path, "wb") as log:
            pending = b""
            while chunk := child.stdout.read1(65536):
                log.write(chunk)
                pending += chunk
                # tqdm redraws its line with \r; log lines end with \n: both end a piece worth reading.
                *pieces, pending = re.split(rb"[\r\n]", pending)
                for piece in pieces:
                    self._show(name, bar, piece.decode(errors="replace").strip())

    def _show(self, name: str, bar, line: str) -> None:
        progress = PROGRESS.search(line)
        if progress:
            done, total = int(progress.group(1)), int(progress.group(2))
            bar.total = total
            bar.update(done - bar.n)
        elif line and not OTHER_BAR.search(line):  # other bars (caching, loading) stay in the log
            bar.write(f"[{name}] {line}", file=sys.stderr)

    def forward(self, signum: int, frame) -> None:
        """First signal: each running training finishes its step and checkpoints. A second one (the user
        insisting) is a second Ctrl-C to them: they exit at once, without a checkpoint of the unfinished step."""
        again = self.stopped_by is not None
        self.stopped_by = self.stopped_by or signal.Signals(signum).name
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGINT if again else signal.SIGTERM)

    def wait(self, finished_early=None) -> dict[str, int]:
        """Exit statuses by name. A training that fails stops the other one (it checkpoints), so a bad dataset
        ends the demo in seconds instead of after the other adapter's minutes. `finished_early(name)` is called
        once for a training that ends well while another still runs (its core is free from then on)."""
        announced = set()
        while None in (codes := [child.poll() for child in self.children.values()]):
            failed = any(code not in (None, 0) for code in codes)
            if failed and not self.failed and self.stopped_by is None:
                self.failed = True
                for child in self.children.values():
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
            for name, child in self.children.items():
                if child.returncode == 0 and name not in announced and not failed and self.stopped_by is None:
                    announced.add(name)
                    if finished_early:
                        finished_early(name)
            time.sleep(0.2)
        for reader in self.readers:
            reader.join()
        for bar in self.bars.values():
            bar.close()
        return {name: child.returncode for name, child in self.children.items()}


PROGRESS = re.compile(r"^training:\s+\d+%.*?\|\s*(\d+)/(\d+)")
OTHER_BAR = re.compile(r"\d+%\|")


def train_adapters(out: Path, steps: int | None, fresh: bool, finished_early=None) -> tuple[Path, Path]:
    names = ("style", "subject")
    commands = {name: adapter_command(name, out, steps, fresh) for name in names}
    trainings = Trainings(commands, out)
    previous = {signum: signal.signal(signum, trainings.forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = trainings.wait(finished_early)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A training stopped on request (the user's, or because the other one failed) is not a failure of its own; one
    # still loading when the request came has no handler yet and ends by the signal itself (a negative status).
    stopped_codes = ((EXIT_STOPPED, EXIT_ABORTED, -signal.SIGTERM, -signal.SIGINT) if trainings.stopped_by
                     else (EXIT_STOPPED, -signal.SIGTERM) * trainings.failed)
    for name, code in codes.items():
        if code != 0 and code not in stopped_codes:
            raise UserError(f"the {name} training failed (exit status {code}); its log: {out / name / 'train.log'}")
    if trainings.stopped_by:
        where = ", ".join(f"step {checkpoint_step(out / name)} of the {name} adapter" if checkpoint_step(out / name)
                          else f"the start of the {name} adapter" for name in names)
        raise Stopped(f"{trainings.stopped_by} at {where} (each started training checkpointed)")
    return out / "style" / "demo_style.safetensors", out / "subject" / "demo_subject.safetensors"


def checkpoint_step(run_dir: Path) -> int:
    latest = latest_checkpoint(run_dir / "checkpoints")
    return int(latest.name.split("-")[-1]) if latest else 0


def data_override(config_path: Path, name: str) -> str:
    """The config's image folders, found from any working folder: its `data.sources` (the subject adds prior images)
    or its `data.path` (the style's dial folders), under the checkout."""
    data = read_config_file(config_path).get("data") or {}
    sources = data.get("sources")
    if not sources:
        return f"data.path={ROOT / data.get('path', f'datasets/demo-{name}')}"
    # JSON is YAML's flow style: the override reads as the same list, each path made absolute.
    return "data.sources=" + json.dumps([{**source, "path": str(ROOT / source["path"])} for source in sources])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, help="override train.steps of both LoRAs")
    parser.add_argument("--fresh", action="store_true", help="start both trainings over instead of resuming")
    parser.add_argument("--grid-steps", type=int, default=25, help="denoising steps of each picture")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_now)
    again = " ".join(a for a in sys.argv if a != "--fresh")
    try:
        run(args)
    except Stopped as stop:
        print(f"demo stopped by {stop}; run it again to resume:\n  python {again}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except UserError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        sys.exit(2)


def run(args) -> None:
    started = time.perf_counter()
    pictures = Pictures(args.grid_steps)
    adapters = {name: args.out / name / f"demo_{name}.safetensors" for name in ("style", "subject")}
    early: list[threading.Thread] = []
    # Every picture is drawn on one thread, overlapping a training or not: a picture's float sums depend on the
    # thread count (up to 1/255 per pixel), and the demo writes the same pixels every time. (A second thread does
    # not speed up this small model.)
    torch.set_num_threads(1)

    def finished_early(name: str) -> None:
        # The core of the training that ends first is free while the other one runs: it draws every picture that
        # needs only that adapter. A failure there is not reported from the thread: the same pictures are asked for
        # again below, where an error (a damaged adapter file, say) ends the demo with its one line.
        thread = threading.Thread(target=pictures.draw_quietly,
                                  args=({name: adapters[name]}, pictures.needing_only(name)), daemon=True)
        thread.start()
        early.append(thread)

    style, subject = train_adapters(args.out, args.steps, args.fresh, finished_early)
    for thread in early:
        thread.join()
    pictures.draw_on_two_cores({"subject": subject}, pictures.without_style)  # those no thread drew
    pictures.draw_on_two_cores({"style": style, "subject": subject}, pictures.with_style)
    grid_path, sweep_path = pictures.save(args.out)
    print(f"style adapter:   {style}\nsubject adapter: {subject}\ngrid:            {grid_path}\n"
          f"style sweep:     {sweep_path}")
    print(f"done in {time.perf_counter() - started:.0f} s")


class Pictures:
    """The grid (GRID_ROWS x GRID_COLUMNS) and the style sweep (first row, style weight 0 -> 1), each picture drawn
    once, one at a time with the grid's seed: the prompts and seed scripts/quality.py scores tile by tile
    (grid_<row>_<column>_ok, sweep_<weight>_stripes).

    A picture with one adapter at weight 0 is drawn early with the other adapter alone when that one's training ends
    first; the rest with the subject alone (no style) or with both, style first, as quality.py loads them. A picture
    is the same either way: an adapter at weight 0 adds exact zeros."""

    def __init__(self, steps: int = 25) -> None:
        self.steps = steps
        self.drawn: dict[tuple[str, float, float], Image.Image] = {}
        swept = grid_prompt(GRID_ROWS[0], "style").text
        self.rows = [[(grid_prompt(row, kind).text, s, t) for _, _, s, t, kind in GRID_COLUMNS] for row in GRID_ROWS]
        self.sweep = [(swept, w, 0.0) for w in STYLE_WEIGHTS]  # its weight-1 picture is the grid's first style tile
        wanted = list(dict.fromkeys([key for row in self.rows for key in row] + self.sweep))
        self.without_style = [key for key in wanted if key[1] == 0]
        self.with_style = [key for key in wanted if key[1] != 0]

    def needing_only(self, name: str) -> list[tuple[str, float, float]]:
        """The pictures with the other adapter at weight 0 (the base's among them): drawn with `name` alone, they
        are the same pixels as with both loaded."""
        other = {"style": 2, "subject": 1}[name]  # the other adapter's weight in a key (prompt, style, subject)
        return [key for key in self.without_style + self.with_style if key[other] == 0]

    def draw(self, adapters: dict[str, Path], keys: list[tuple[str, float, float]], loaded=None) -> None:
        keys = [key for key in keys if key not in self.drawn]
        if not keys:
            return
        pipe, stack = loaded or self.pipeline(adapters)  # a pipeline and its adapters, loaded
        for prompt, style_weight, subject_weight in keys:
            weights = {"style": style_weight, "subject": subject_weight}
            stack.set_weights({label: (weights[name],) * 2 for label, name in zip(stack.names, adapters)})
            picture = inference.generate(pipe, prompt, seed=GRID_SEED, steps=self.steps, guidance_scale=5.0)[0]
            self.drawn[prompt, style_weight, subject_weight] = picture

    @staticmethod
    def pipeline(adapters: dict[str, Path]):
        # Loading is not thread-safe (it builds models on the meta device through patched globals): one at a time.
        pipe = inference.build_pipeline(load_base_model("sdlora:shapes"))
        settle_host_memory(retain=True)  # as `sdlora generate` does: CPU denoising steps reuse their memory
        return pipe, inference.stack_adapters(pipe, [inference.AdapterSpec(str(path)) for path in adapters.values()])

    def draw_on_two_cores(self, adapters: dict[str, Path], keys: list[tuple[str, float, float]]) -> None:
        """Half the pictures in a second thread with its own pipeline: each picture is still drawn on one thread
        (the same pixels), and the two halves use both cores (denoising releases the GIL)."""
        keys = [key for key in keys if key not in self.drawn]
        if len(keys) < 2:
            return self.draw(adapters, keys)
        mine, theirs = self.pipeline(adapters), self.pipeline(adapters)
        other = threading.Thread(target=self.draw_quietly, args=(adapters, keys[1::2], theirs), daemon=True)
        other.start()
        self.draw(adapters, keys[0::2], mine)
        other.join()
        self.draw(adapters, keys, mine)  # what the other thread could not draw, with its error reported here

    def draw_quietly(self, adapters: dict[str, Path], keys: list[tuple[str, float, float]], loaded=None) -> None:
        try:
            self.draw(adapters, keys, loaded)
        except Exception:  # noqa: BLE001 -- asked for again by the caller, who reports it
            pass

    def save(self, out: Path) -> tuple[Path, Path]:
        rows = [[self.drawn[key] for key in row] for row in self.rows]
        grid = compose(rows, [f"{c} {s}\non {b}" for c, s, b in GRID_ROWS], [c[1] for c in GRID_COLUMNS])
        swept = self.sweep[0][0]
        sweep = compose([[self.drawn[key] for key in self.sweep]], [""], [f"style {w:g}" for w in STYLE_WEIGHTS],
                        title=f"\"{swept}\"")
        grid_path, sweep_path = out / "demo_grid.png", out / "demo_sweep.png"
        grid.save(grid_path)
        sweep.save(sweep_path)
        return grid_path, sweep_path


def compose(rows: list[list[Image.Image]], row_labels: list[str], column_titles: list[str], title: str = "",
            scale: int = 3) -> Image.Image:
    """A labelled grid, each 64 px picture enlarged `scale` times without smoothing (the stripes stay sharp), with
    text large enough to read when the README shrinks the picture to its column width."""
    font = ImageFont.load_default(size=22)
    side = rows[0][0].width * scale
    gap, label_width = 8, 170 if any(row_labels) else 0
    title_height = 40 if title else 0
    header = 62  # two lines of column title
    width = label_width + len(column_titles) * (side + gap) + gap
    height = title_height + header + len(rows) * (side + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, 8), title, fill="black", font=font, anchor="ma")
    for column, text in enumerate(column_titles):
        x = label_width + gap + column * (side + gap) + side // 2
        draw.multiline_text((x, title_height + header - 6), wrap(text, font, side), fill="black", font=font,
                            anchor="md", align="center")
    for number, (row, label) in enumerate(zip(rows, row_labels)):
        y = title_height + header + gap + number * (side + gap)
        draw.multiline_text((gap, y + side // 2), label, fill="black", font=font, anchor="lm")
        for column, image in enumerate(row):
            x = label_width + gap + column * (side + gap)
            canvas.paste(image.resize((side, side), resample=Image.Resampling.NEAREST), (x, y))
    return canvas


def wrap(text: str, font, width: int) -> str:
    """Break a column title into lines no wider than its picture."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
