"""Share tab: a run's model card as it will be uploaded, and Push (the token is whatever huggingface_hub finds:
`HF_TOKEN` or `hf auth login`; this page never reads, shows or stores it)."""

from __future__ import annotations

import gradio as gr

from sdlora.errors import UserError
from sdlora.ui.app import Settings, problem, run_choices
from sdlora.ui.paths import inside_roots


def build(settings: Settings) -> None:
    from sdlora import hub
    from sdlora.hub.card import build_card

    with gr.Row():
        run = gr.Dropdown(run_choices(settings), label="Run", allow_custom_value=True, scale=3, elem_id="share-run")
        repo = gr.Textbox(label="Hub repository (user/name)", scale=2, elem_id="share-repo")
    with gr.Row():
        preview_button = gr.Button("Preview card", elem_id="card-button")
        push_button = gr.Button("Push", variant="primary", elem_id="push")
    gr.Markdown("The token comes from `HF_TOKEN` or `hf auth login`; it is never shown or written by this page.")
    card = gr.Markdown(elem_id="card-preview")
    pushed = gr.Markdown(elem_id="pushed")

    def preview(folder, repo_id):
        try:
            return str(build_card(inside_roots(folder, [settings.runs_root]), repo_id=repo_id or None).text)
        except UserError as exc:
            return problem(exc)

    def push(folder, repo_id):
        try:
            return f"ok: pushed: {hub.push(inside_roots(folder, [settings.runs_root]), repo_id)}"
        except UserError as exc:
            return problem(exc)

    preview_button.click(preview, [run, repo], card, api_name="card")
    push_button.click(push, [run, repo], pushed, api_name="push")
