"""The page: four tabs (Dataset, Train, Generate, Share) wired to `dataset.py`, `form.py`, `runs.py`,
`generate.py` and `sdlora.hub`. Only layout and wiring here; every button's work is one call into those."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import yaml

from sdlora.config import ConfigError, RunConfig, validate_config
from sdlora.errors import UserError
from sdlora.ui import dataset, form, runs
from sdlora.ui import generate as generation
from sdlora.ui.paths import inside_roots

ADAPTER_ROWS = 3
POLL_SECONDS = 1.0


@dataclass
class Settings:
    roots: list[Path]
    runs_root: Path
    images: Path  # where Generate saves its PNGs
    cpus: int | None = None
    schema: list[form.Field] = field(default_factory=form.fields)

    @property
    def readable(self) -> list[Path]:
        return [*self.roots, self.runs_root, self.images]


def _problem(exc: Exception) -> str:
    return "error: " + str(exc).replace("\n", "\n\nerror: ")


def _config(settings: Settings, source: str, yaml_text: str, values) -> RunConfig:
    """The validated config from the form or the YAML editor, its data folder inside a root and its output folder
    inside the runs root (where a restarted UI looks for it)."""
    if source == "YAML":
        try:
            data = yaml.safe_load(yaml_text or "") or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"YAML editor: cannot parse: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError("YAML editor: the top level must be a mapping of sections (model:, data:, train:, ...)")
    else:
        data = form.to_config_dict(settings.schema, list(values))
    config = validate_config(data, source="the form" if source == "Form" else "the YAML editor")
    data = config.to_dict()
    data["data"]["path"] = str(inside_roots(config.data.path, settings.roots))
    for number, src in enumerate(config.data.sources):
        data["data"]["sources"][number]["path"] = str(inside_roots(src.path, settings.roots))
    data["output"]["dir"] = str(settings.runs_root / Path(config.output.dir).name)
    return validate_config(data, source="the form")


def _run_choices(settings: Settings) -> list[tuple[str, str]]:
    return [(r.label, str(r.folder)) for r in runs.list_runs(settings.runs_root)]


def _adapter_choices(settings: Settings) -> list[str]:
    return [str(p) for r in runs.list_runs(settings.runs_root) for p in sorted(r.folder.glob("*.safetensors"))]


def _charts(folder: str | None):
    import pandas as pd

    rows = [r for r in runs.read_log(folder) if r.get("loss") is not None] if folder else []
    loss = pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]})
    rate = pd.DataFrame({"step": [r["step"] for r in rows], "lr": [r["lr"] for r in rows]})
    return loss, rate


def _watch(settings: Settings, folder: str | None):
    """What the Train tab shows for the selected run: progress line, loss and lr charts, samples, runs list."""
    choices = _run_choices(settings)
    if not folder:
        return ("No run selected.", *_charts(None), [], gr.update(choices=choices))
    run = runs.info(folder)
    eta = runs.eta_seconds(folder) if run.status == "running" else None
    progress = f"**{run.label}**" + (f", about {eta:.0f} s left" if eta is not None else "")
    pictures = [(str(p), p.stem) for p in runs.samples(folder)]
    return (progress, *_charts(folder), pictures, gr.update(choices=choices))


def build(settings: Settings) -> gr.Blocks:
    with gr.Blocks(title="sdlora") as page:
        gr.Markdown("# sdlora")
        with gr.Tab("Dataset", id="dataset"):
            with gr.Row():
                folder = gr.Textbox(label=f"Folder (inside {', '.join(map(str, settings.roots))})", scale=4,
                                    elem_id="dataset-folder")
                resolution = gr.Number(512, label="Resolution", precision=0, scale=1)
                open_button = gr.Button("Open", variant="primary", scale=1, elem_id="dataset-open")
            gallery = gr.Gallery(label="Images and captions", columns=8, height="auto", elem_id="dataset-gallery")
            with gr.Row():
                image_path = gr.Textbox(label="Image", interactive=False, scale=2, elem_id="caption-image")
                caption = gr.Textbox(label="Caption", scale=4, elem_id="caption-text")
                save_button = gr.Button("Save caption", scale=1, elem_id="caption-save")
            caption_status = gr.Markdown(elem_id="caption-status")
            problems = gr.Dataframe(headers=["file", "problem", "detail"], label="Problem files", interactive=False)
            report = gr.Code(label="Preflight report (sdlora dataset check)", language=None, elem_id="preflight")

            def open_folder(path, size):
                try:
                    items = dataset.images_with_captions(path, settings.roots)
                    table, found = dataset.report(path, settings.roots, int(size or 512))
                except UserError as exc:
                    return [], _problem(exc), [], ""
                return [(str(p), c) for p, c in items], f"{len(items)} images", found, table

            open_button.click(open_folder, [folder, resolution], [gallery, caption_status, problems, report],
                              api_name="open_dataset")

            def select(folder_text, event: gr.SelectData):
                """The gallery shows served copies; the folder and the index name the original image."""
                try:
                    picture, text = dataset.images_with_captions(folder_text, settings.roots)[event.index]
                except (UserError, IndexError):
                    return "", ""
                return str(picture), text

            gallery.select(select, folder, [image_path, caption], api_name=False)

            def save(path_of_image, text):
                try:
                    written = dataset.save_caption(path_of_image, text, settings.roots)
                except UserError as exc:
                    return _problem(exc)
                return f"ok: saved {written.name}"

            save_button.click(save, [image_path, caption], caption_status, api_name="save_caption")

        with gr.Tab("Train", id="train"):
            # The runs first (what a returning user looks for), the config of a new run below.
            with gr.Row():
                run_list = gr.Dropdown(_run_choices(settings), label="Runs", allow_custom_value=True, scale=4,
                                       elem_id="run-list")
                stop_button = gr.Button("Stop", elem_id="stop", scale=1)
                resume_button = gr.Button("Resume", elem_id="resume", scale=1)
            progress = gr.Markdown(elem_id="run-progress")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", title="loss", elem_id="loss-chart")
                lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="lr-chart")
            sample_gallery = gr.Gallery(label="Samples", columns=4, height=320, object_fit="contain",
                                        elem_id="samples")
            source = gr.Radio(["Form", "YAML"], value="Form", label="New run: config from", elem_id="config-source")
            widgets = []
            with gr.Accordion("Form (every field of the config schema, with its default)", open=True):
                for section in dict.fromkeys(f.section for f in settings.schema):
                    with gr.Accordion(section, open=True, elem_id=f"section-{section}"):
                        for item in (f for f in settings.schema if f.section == section):
                            widgets.append(_widget(item))
            with gr.Accordion("YAML", open=False):
                yaml_text = gr.Code(language="yaml", label="Config YAML", elem_id="config-yaml")
                to_form = gr.Button("Load YAML into the form")
            with gr.Row():
                validate_button = gr.Button("Validate", elem_id="validate")
                start_button = gr.Button("Start", variant="primary", elem_id="start")
            message = gr.Markdown(elem_id="train-message")

            def to_form_values(text):
                try:
                    data = yaml.safe_load(text or "") or {}
                except yaml.YAMLError as exc:
                    raise gr.Error(f"YAML editor: cannot parse: {' '.join(str(exc).split())}")
                return form.from_config_dict(settings.schema, data if isinstance(data, dict) else {})

            to_form.click(to_form_values, yaml_text, widgets, api_name=False)

            def validate(kind, text, *values):
                try:
                    config = _config(settings, kind, text, values)
                except UserError as exc:
                    return _problem(exc)
                return f"ok: valid: {config.train.steps} steps into {config.output.dir}"

            def start(kind, text, *values):
                try:
                    run = runs.start(_config(settings, kind, text, values), settings.runs_root)
                except UserError as exc:
                    return _problem(exc), gr.update()
                return (f"ok: started {run.folder.name} (process {run.pid})",
                        gr.update(choices=_run_choices(settings), value=str(run.folder)))

            validate_button.click(validate, [source, yaml_text, *widgets], message, api_name="validate")
            start_button.click(start, [source, yaml_text, *widgets], [message, run_list], api_name="start")

            def act(action, folder_text):
                try:
                    action(inside_roots(folder_text, [settings.runs_root]))
                except UserError as exc:
                    return _problem(exc)
                return f"ok: {action.__name__}: {Path(folder_text).name}"

            stop_button.click(lambda f: act(runs.stop, f), run_list, message, api_name="stop")
            resume_button.click(lambda f: act(runs.resume, f), run_list, message, api_name="resume")
            watched = [progress, loss_plot, lr_plot, sample_gallery, run_list]
            gr.Timer(POLL_SECONDS).tick(lambda f: _watch(settings, f), run_list, watched, api_name=False,
                                        show_progress="hidden")  # a poll every second: no spinner flashing
            run_list.change(lambda f: _watch(settings, f), run_list, watched, api_name="watch")

        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                base = gr.Textbox(label="Base (empty: the one the adapters were trained on)", elem_id="gen-base")
                prompt = gr.Textbox(label="Prompt", scale=3, elem_id="gen-prompt")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0)
                steps = gr.Slider(1, 100, 20, step=1, label="Steps", elem_id="gen-steps")
                guidance = gr.Slider(1, 15, 7.5, step=0.5, label="Guidance")
            adapters = []
            for number in range(ADAPTER_ROWS):
                with gr.Row():
                    adapters.append(gr.Dropdown(_adapter_choices(settings), label=f"Adapter {number + 1}", scale=4,
                                                allow_custom_value=True, elem_id=f"adapter-{number}"))
                    adapters.append(gr.Slider(-2, 2, 1.0, step=0.05, label="Weight", elem_id=f"weight-{number}"))
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            result = gr.Image(label="Result", type="filepath", elem_id="gen-result")
            used = gr.Textbox(label="Saved with these parameters (PNG text)", elem_id="gen-info")

            def run_generation(base_text, prompt_text, seed_value, step_count, scale, *pairs):
                chosen = []
                try:
                    for path, weight in zip(pairs[::2], pairs[1::2]):
                        if path:
                            chosen.append((str(inside_roots(path, settings.readable)), float(weight)))
                    # A training has the cores: generate on one thread beside it, never fight it for all of them.
                    threads = 1 if runs.training(settings.runs_root) else (os.cpu_count() or 1)
                    out = generation.generate(base_text, prompt_text, seed_value, step_count, scale, chosen,
                                              settings.images, threads)
                except UserError as exc:
                    raise gr.Error(str(exc))
                return str(out), generation.parameters_text(prompt_text, int(seed_value), int(step_count),
                                                            float(scale), base_text or "(from the adapters)", chosen)

            generate_button.click(run_generation, [base, prompt, seed, steps, guidance, *adapters], [result, used],
                                  api_name="generate")
            refresh = gr.Button("Refresh adapter list", size="sm")
            refresh.click(lambda: [gr.update(choices=_adapter_choices(settings))] * ADAPTER_ROWS, None,
                          adapters[::2], api_name=False)

        with gr.Tab("Share", id="share"):
            _share_tab(settings)
    return page


def _widget(item: form.Field):
    label, info, elem_id = item.key.split(".", 1)[1], item.description or None, "field-" + item.key.replace(".", "-")
    if item.kind == "bool":
        return gr.Checkbox(item.default, label=label, info=info, elem_id=elem_id)
    if item.kind in ("int", "float"):
        return gr.Number(item.default, label=label, info=info, precision=0 if item.kind == "int" else None,
                         elem_id=elem_id)
    if item.kind == "choice":
        return gr.Dropdown(list(item.choices), value=item.default, label=label, info=info, elem_id=elem_id)
    return gr.Textbox(item.default, label=label + (" (YAML)" if item.kind == "yaml" else ""), info=info,
                      elem_id=elem_id)


def _share_tab(settings: Settings) -> None:
    from sdlora import hub
    from sdlora.hub.card import build_card

    with gr.Row():
        run = gr.Dropdown(_run_choices(settings), label="Run", allow_custom_value=True, scale=3, elem_id="share-run")
        repo = gr.Textbox(label="Hub repository (user/name)", scale=2)
    with gr.Row():
        preview_button = gr.Button("Preview card", elem_id="card-button")
        push_button = gr.Button("Push", variant="primary")
    gr.Markdown("The token comes from `HF_TOKEN` or `hf auth login`; it is never shown or written by this page.")
    card = gr.Markdown(elem_id="card-preview")
    pushed = gr.Markdown()

    def preview(folder, repo_id):
        try:
            return str(build_card(inside_roots(folder, [settings.runs_root]), repo_id=repo_id or None).text)
        except UserError as exc:
            return _problem(exc)

    def push(folder, repo_id):
        try:
            return f"ok: pushed: {hub.push(inside_roots(folder, [settings.runs_root]), repo_id)}"
        except UserError as exc:
            return _problem(exc)

    preview_button.click(preview, [run, repo], card, api_name="card")
    push_button.click(push, [run, repo], pushed, api_name="push")
