"""Train tab: the runs (queued, running, finished) with stop and resume; progress with the time left; the live
loss chart (training and validation) and learning rate from train_log.jsonl; the sample images; and a new run's
config, from a form built off the schema (each error shown at its field) or a YAML editor."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import yaml

from sdlora.config import ConfigError, RunConfig, validate_config
from sdlora.errors import UserError
from sdlora.ui import form, runs
from sdlora.ui.app import Settings, problem, run_choices
from sdlora.ui.paths import inside_roots

POLL_SECONDS = 1.0
SHOWN_SAMPLES = 6  # sample grids in the Train tab (two rows of three)


def config_of(settings: Settings, source: str, yaml_text: str, values) -> RunConfig:
    """The validated config from the form or the YAML editor, its data folder inside a root and its output folder
    inside the runs root (where a restarted UI looks for it)."""
    if source == "YAML":
        data = _yaml(yaml_text)
    else:
        data = form.to_config_dict(settings.schema, list(values))
    config = validate_config(data, source="the form" if source == "Form" else "the YAML editor")
    data = config.to_dict()
    data["data"]["path"] = str(inside_roots(config.data.path, settings.roots))
    for number, src in enumerate(config.data.sources):
        data["data"]["sources"][number]["path"] = str(inside_roots(src.path, settings.roots))
    data["output"]["dir"] = str(settings.runs_root / Path(config.output.dir).name)
    return validate_config(data, source="the form")


def _yaml(text: str) -> dict:
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML editor: cannot parse: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError("YAML editor: the top level must be a mapping of sections (model:, data:, train:, ...)")
    return data


def charts(folder: str | None):
    """The loss chart (train and validation series) and the learning-rate chart, from train_log.jsonl."""
    import pandas as pd

    points = runs.chart_rows(folder) if folder else []
    loss = [{"step": p["step"], "loss": p["value"], "series": p["series"]} for p in points
            if p["series"] != "learning rate"]
    if loss and runs.validates(folder) and not any(p["series"] == "validation loss" for p in loss):
        # A run that will score its held-out set: the series is named from the first point (gradio's chart keeps
        # the series it was first drawn with), as an empty point until the first validation loss is logged.
        loss.append({"step": loss[0]["step"], "loss": float("nan"), "series": "validation loss"})
    rate = [{"step": p["step"], "lr": p["value"]} for p in points if p["series"] == "learning rate"]
    # Numeric columns even when empty: a chart first drawn from an empty (object) column keeps a categorical axis.
    return (pd.DataFrame(loss, columns=["step", "loss", "series"]).astype({"step": "int64", "loss": "float64"}),
            pd.DataFrame(rate, columns=["step", "lr"]).astype({"step": "int64", "lr": "float64"}))


def watch(settings: Settings, folder: str | None):
    """What the Train tab shows for the selected run: progress line, loss and lr charts, samples, runs list."""
    runs.advance(settings.runs_root)  # the queue also moves from the server's own thread; this is just sooner
    choices = run_choices(settings)
    if not folder:
        return ("No run selected.", *_shown(charts(None)), [], gr.update(choices=choices))
    run = runs.info(folder)
    eta = runs.eta_seconds(folder) if run.status == "running" else None
    progress = f"**{run.label}**" + (f", about {eta:.0f} s left" if eta is not None else "")
    if run.status == "queued":
        progress += " (waits for the run training now: one training at a time)"
    pictures = [(str(p), _sample_label(p)) for p in runs.samples(folder)]
    return (progress, *_shown(charts(folder)), pictures[::-1][:SHOWN_SAMPLES], gr.update(choices=choices))


def _shown(frames):
    """A chart is hidden until its first point: one first drawn empty keeps the axes sized for no labels."""
    return [gr.update(value=frame, visible=not frame.empty) for frame in frames]


def _sample_label(path: Path) -> str:
    number = path.stem.rsplit("-", 1)[-1]  # samples/step-000010.png
    return f"step {int(number)}" if number.isdigit() else path.stem


def build(settings: Settings) -> None:
    # The runs first (what a returning user looks for), the config of a new run below.
    with gr.Row():
        run_list = gr.Dropdown(run_choices(settings), label="Runs", allow_custom_value=True, scale=4,
                               elem_id="run-list")
        stop_button = gr.Button("Stop", elem_id="stop", scale=1)
        resume_button = gr.Button("Resume", elem_id="resume", scale=1)
    progress = gr.Markdown(elem_id="run-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="loss", elem_id="loss-chart",
                                x_axis_format="d", height=260, visible=False,
                                color_map={"train loss": "#1f77b4", "validation loss": "#ff7f0e"})
        lr_plot = gr.LinePlot(x="step", y="lr", title="learning rate", elem_id="lr-chart", x_axis_format="d",
                              y_axis_format=".1e", height=260, visible=False)  # 1.0e-4, not a clipped 0.000100
    # Height "auto": a fixed height cut every sample grid's lower half (its pictures) off below its prompt labels.
    # At most SHOWN_SAMPLES, so a long run's samples do not push the form off the page.
    sample_gallery = gr.Gallery(label=f"Samples (the newest {SHOWN_SAMPLES}, newest first)", columns=3,
                                height="auto", object_fit="contain", allow_preview=False, elem_id="samples")
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
            data = _yaml(text)
        except ConfigError as exc:
            raise gr.Error(str(exc))
        return form.from_config_dict(settings.schema, data)

    to_form.click(to_form_values, yaml_text, widgets, api_name=False)

    def at_fields(kind, text, *values):
        """Each form error at its own field, before Validate or Start runs (gradio shows a gr.validate message on
        the input it belongs to). Errors of the YAML editor, and paths outside the roots, are shown under the form."""
        if kind != "Form":
            return [gr.validate(True, "")] * (2 + len(values))
        errors = form.field_errors(settings.schema, list(values))
        return [gr.validate(True, ""), gr.validate(True, "")] + [
            gr.validate(f.key not in errors, errors.get(f.key, "")) for f in settings.schema]

    def validate(kind, text, *values):
        try:
            config = config_of(settings, kind, text, values)
        except UserError as exc:
            return problem(exc)
        return f"ok: valid: {config.train.steps} steps into {config.output.dir}"

    def start(kind, text, *values):
        try:
            run = runs.start(config_of(settings, kind, text, values), settings.runs_root)
        except UserError as exc:
            return problem(exc), gr.update()
        verb = "queued" if run.status == "queued" else "started"
        return (f"ok: {verb} {run.folder.name}" + (f" (process {run.pid})" if run.pid else
                                                   " (it starts when the run training now ends)"),
                gr.update(choices=run_choices(settings), value=str(run.folder)))

    inputs = [source, yaml_text, *widgets]
    validate_button.click(validate, inputs, message, api_name="validate", validator=at_fields)
    start_button.click(start, inputs, [message, run_list], api_name="start", validator=at_fields)

    def act(action, folder_text):
        try:
            done = action(inside_roots(folder_text, [settings.runs_root]))
        except UserError as exc:
            return problem(exc)
        return f"ok: {action.__name__}: {Path(folder_text).name}" + (" (left the queue)" if done.status == "cancelled"
                                                                     else "")

    stop_button.click(lambda f: act(runs.stop, f), run_list, message, api_name="stop")
    resume_button.click(lambda f: act(runs.resume, f), run_list, message, api_name="resume")
    watched = [progress, loss_plot, lr_plot, sample_gallery, run_list]
    shown = gr.State([])  # the sample files the gallery shows: it is redrawn only when a new one appears

    def tick(folder, showing):
        out = watch(settings, folder)
        files = [path for path, _ in out[3]]
        return (*out[:3], gr.skip() if files == showing else out[3], out[4], files)

    gr.Timer(POLL_SECONDS).tick(tick, [run_list, shown], [*watched, shown], api_name=False,
                                show_progress="hidden")  # a poll every second: no spinner flashing
    run_list.change(lambda f: watch(settings, f), run_list, watched, api_name="watch")


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
