"""Dataset tab: open a folder or a run config; thumbnails with captions (problem images marked with their reason);
edit and save a caption; the preflight report and its problem files."""

from __future__ import annotations

import gradio as gr

from sdlora.errors import UserError
from sdlora.ui import dataset
from sdlora.ui.app import Settings, problem


def build(settings: Settings) -> None:
    with gr.Row():
        folder = gr.Textbox(label=f"Folder or run config (inside {', '.join(map(str, settings.roots))})", scale=4,
                            elem_id="dataset-folder")
        resolution = gr.Number(512, label="Resolution (a folder's)", precision=0, scale=1,
                               elem_id="dataset-resolution")
        open_button = gr.Button("Open", variant="primary", scale=1, elem_id="dataset-open")
    opened = gr.State([])  # the images shown, in gallery order: a click names one by its index
    gallery = gr.Gallery(label="Images and captions (⚠: a problem the preflight found)", columns=8, height="auto",
                         elem_id="dataset-gallery")
    with gr.Row():
        image_path = gr.Textbox(label="Image", interactive=False, scale=2, elem_id="caption-image")
        caption = gr.Textbox(label="Caption", scale=4, elem_id="caption-text")
        save_button = gr.Button("Save caption", scale=1, elem_id="caption-save")
    caption_status = gr.Markdown(elem_id="caption-status")
    problems = gr.Dataframe(headers=["file", "problem", "detail"], label="Problem files", interactive=False,
                            elem_id="dataset-problems")
    report = gr.Code(label="Preflight report (sdlora dataset check)", language=None, elem_id="preflight")

    def open_path(path, size):
        try:
            shown, table, found = dataset.thumbnails(path, settings.roots, int(size or 512))
        except UserError as exc:
            return [], problem(exc), [], "", []
        marked = sum(1 for t in shown if t.problem)
        status = f"{len(shown)} images" + (f", {marked} marked ⚠" if marked else "")
        return [(str(t.image), t.label) for t in shown], status, found, table, [str(t.image) for t in shown]

    open_button.click(open_path, [folder, resolution], [gallery, caption_status, problems, report, opened],
                      api_name="open_dataset")

    def select(images, event: gr.SelectData):
        """The gallery shows served copies; the index names the original image, whose caption file is read."""
        try:
            picture = images[event.index]
            return picture, dataset.read_caption(picture, settings.roots)
        except (UserError, IndexError):
            return "", ""

    gallery.select(select, opened, [image_path, caption], api_name=False)

    def save(path_of_image, text):
        try:
            written = dataset.save_caption(path_of_image, text, settings.roots)
        except UserError as exc:
            return problem(exc)
        return f"ok: saved {written.name}"

    save_button.click(save, [image_path, caption], caption_status, api_name="save_caption")
