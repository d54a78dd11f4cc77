"""The PNG Info tab: drop a PNG, read its A1111 parameters, send them to the Generate tab."""
from __future__ import annotations

import gradio as gr

from ..engine import Engine
from ..generate import params_from_infotext
from ..infotext import Infotext, format_infotext, read_png
from .generate import GenerateTab
from .models import download_progress

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp"]  # what A1111 and ComfyUI save; gradio refuses others by name


def read_parameters(path: str | None) -> tuple[str, Infotext | None]:
    if not path:
        return "", None
    try:
        info = read_png(path)
    except Exception:  # not an image, truncated file, ...: say so instead of failing
        return "This file could not be read as an image.", None
    if info is None:
        return "No generation parameters in this image (no A1111 'parameters' text).", None
    return format_infotext(info), info


def build(target: GenerateTab, tabs: gr.Tabs, generate_tab_id: str, engine: Engine, public: bool = False) -> None:
    with gr.Row():
        with gr.Column():
            # A file box, not gr.Image: gr.Image opens every upload with PIL first, so a non-image or a huge PNG
            # failed inside gradio with no message; read_png reads only the text chunks of whatever is dropped.
            image = gr.File(label="Source PNG", file_types=IMAGE_TYPES, type="filepath", elem_id="png-info-file")
            preview = gr.Image(label="Preview", interactive=False, height=320)
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="png-info-text")
            send = gr.Button("Send to Generate", variant="primary")
            note = gr.Markdown("")
            fetch = gr.Button("Download the model", visible=False, elem_id="png-info-fetch")
            wanted = gr.State(None)  # the Hub id the image names, when it is not on this machine
    def png_info(path: str | None) -> str:
        """Read the generation parameters (prompt, negative prompt, steps, sampler, CFG scale, seed, size, model)
        that A1111, ComfyUI or this app stored in an image.

        Args:
            path: The image (PNG, JPEG or WebP).
        """
        return read_parameters(path)[0]

    image.change(png_info, image, text, api_name="png_info")
    image.change(lambda p: p, image, preview, api_visibility="private")  # the browser draws it; we never decode

    def send_to_generate(path: str | None):
        _, info = read_parameters(path)
        if info is None:
            raise gr.Error("drop a PNG with generation parameters first")
        params, ignored = params_from_infotext(info)
        cfg = gr.skip() if params.guidance_scale is None else params.guidance_scale  # absent: keep the slider's
        values = [params.prompt, params.negative_prompt, params.sampler, params.schedule, params.steps, cfg,
                  params.width or gr.skip(), params.height or gr.skip(), params.seed, params.batch_size,
                  params.clip_skip]
        msg = f"Not applied: {', '.join(ignored)}" if ignored else ""
        here, hub_id = engine.locate_model(info.params.get("Model"), public)
        if hub_id:  # stay on this tab: the model must come first
            return [*values, f"This image was made with `{hub_id}`, which is not here yet: download it below. {msg}",
                    gr.skip(), gr.skip(), gr.update(visible=True, value=f"Download {hub_id}"), hub_id]
        return [*values, msg, here or gr.skip(), gr.Tabs(selected=generate_tab_id), gr.update(visible=False), None]

    send.click(send_to_generate, image, [*target.param_components(), note, target.model, tabs, fetch, wanted],
               api_visibility="private")

    def download(hub_id: str, progress=gr.Progress()):
        try:
            # a stranger's PNG named it: never pickle weights, whatever --allow-pickle says
            engine.download(hub_id, "model", public, download_progress(progress), allow_pickle=False)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return (f"Downloaded `{hub_id}`.", gr.update(choices=engine.model_choices(public), value=hub_id),
                gr.Tabs(selected=generate_tab_id), gr.update(visible=False))

    fetch.click(download, wanted, [note, target.model, tabs, fetch], api_visibility="private")
