"""The PNG Info tab: drop a PNG, read its A1111 parameters, send them to the Generate tab."""
from __future__ import annotations

import gradio as gr

from ..engine import Engine
from ..generate import params_from_infotext
from ..infotext import Infotext, format_infotext, read_png
from ..models import parse_lora
from .generate import GenerateTab, UserError, add_lora, said_on, speed_values
from .img2img import Img2imgTab
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


def _names(wanted: dict, quote: str = "") -> str:
    """The Hub ids of what an image needs and this machine lacks, for a message or a button."""
    ids = [wanted.get("model"), *(parse_lora(e)[0] for e in wanted.get("loras", []))]
    return ", ".join(f"{quote}{x}{quote}" for x in ids if x)


def make_send_to_generate(engine: Engine, public: bool, generate_tab_id: str):
    """"Send to Generate" of an image file (PNG Info, History): its parameters into the Generate tab's controls, its
    model and LoRAs when they are here; else a note and a Download button for the Hub ones (``send_targets``)."""
    def send_to_generate(path: str | None, who: str | None):
        _, info = read_parameters(path)
        if info is None:
            raise UserError("drop a PNG with generation parameters first")
        params, ignored = params_from_infotext(info)
        cfg = gr.skip() if params.guidance_scale is None else params.guidance_scale  # absent: keep the slider's
        values = [params.prompt, params.negative_prompt, params.sampler, params.schedule, params.steps, cfg,
                  params.width or gr.skip(), params.height or gr.skip(), params.seed, params.batch_size,
                  params.clip_skip, *speed_values(params)]
        here, hub_id = engine.locate_model(info.params.get("Model"), public)
        loras, fetch_loras, unknown = engine.locate_loras(info.params.get("Lora"), public, who)
        ignored += [f"LoRA {name} (not here)" for name in unknown]
        msg = f"Not applied: {', '.join(ignored)}" if ignored else ""
        lora_text = ", ".join(loras)
        if hub_id or fetch_loras:  # stay on this tab: they must come first
            wanted = {"model": hub_id, "loras": fetch_loras}
            return [*values, f"This image was made with {_names(wanted, '`')}, not here yet: download below. {msg}",
                    lora_text, gr.skip(), gr.skip(), gr.update(visible=True, value=f"Download {_names(wanted)}"),
                    wanted]
        return [*values, msg, lora_text, here or gr.skip(), gr.Tabs(selected=generate_tab_id),
                gr.update(visible=False), None]

    return send_to_generate


def build(target: GenerateTab, tabs: gr.Tabs, generate_tab_id: str, engine: Engine, public: bool = False,
          visitor: gr.State | None = None, img2img: Img2imgTab | None = None) -> None:
    """Lay out the tab and wire its events. ``visitor`` (ui.train.visitor_state): whose training runs an image's
    LoRAs may name on a public app."""
    visitor = visitor if visitor is not None else gr.State(None)
    with gr.Row():
        with gr.Column():
            # A file box, not gr.Image: gr.Image opens every upload with PIL first, so a non-image or a huge PNG
            # failed inside gradio with no message; read_png reads only the text chunks of whatever is dropped.
            image = gr.File(label="Source PNG", file_types=IMAGE_TYPES, type="filepath", elem_id="png-info-file")
            preview = gr.Image(label="Preview", interactive=False, height=320)
        with gr.Column():
            text = gr.Textbox(label="Parameters", lines=8, interactive=False, elem_id="png-info-text")
            with gr.Row():
                send = gr.Button("Send to Generate", variant="primary")
                send_img2img = gr.Button("Send to img2img", visible=img2img is not None, elem_id="png-info-img2img")
            wire_send_to_generate(engine, public, generate_tab_id, target, tabs, send, image, visitor, "png-info")

    def png_info(path: str | None) -> str:
        """Read the generation parameters (prompt, negative prompt, steps, sampler, CFG scale, seed, size, model)
        that A1111, ComfyUI or this app stored in an image.

        Args:
            path: The image (PNG, JPEG or WebP).
        """
        return read_parameters(path)[0]

    image.change(png_info, image, text, api_name="png_info")
    image.change(lambda p: p, image, preview, api_visibility="private")  # the browser draws it; we never decode
    if img2img is not None:
        def picture(path: str | None):
            _, info = read_parameters(path)
            return img2img.values(path, format_infotext(info) if info else None)

        send_img2img.click(picture, image, img2img.targets, api_visibility="private")


def wire_send_to_generate(engine: Engine, public: bool, generate_tab_id: str, target: GenerateTab, tabs: gr.Tabs,
                          button: gr.Button, path: gr.components.Component, visitor: gr.State, name: str) -> None:
    """``button`` sends the image file in ``path`` to the Generate tab (``make_send_to_generate``); a note and a
    Download button (``#NAME-fetch``) for what the image names and this machine lacks are laid out here (call
    inside a layout)."""
    note = gr.Markdown("")
    fetch = gr.Button("Download", visible=False, elem_id=f"{name}-fetch")
    wanted = gr.State(None)  # {"model": Hub id, "loras": ["id:scale"]} the image names and this machine lacks
    button.click(make_send_to_generate(engine, public, generate_tab_id), [path, visitor],
                 [*target.param_components(), *target.speed_components(), note, target.loras, target.model, tabs,
                  fetch, wanted], api_visibility="private")

    def download(wanted: dict | None, current: str, progress=gr.Progress()):
        wanted = wanted or {}
        try:
            # a stranger's PNG named them: never pickle weights, whatever --allow-pickle says
            if wanted.get("model"):
                engine.download(wanted["model"], "model", public, download_progress(progress), allow_pickle=False)
            for entry in wanted.get("loras", []):
                repo_id, scale = parse_lora(entry)
                current = add_lora(current, engine.download(repo_id, "lora", public, download_progress(progress)),
                                   scale)[0]
        except ValueError as exc:
            return said_on(str(exc), 4)
        model = (gr.update(choices=engine.model_choices(public), value=wanted["model"]) if wanted.get("model")
                 else gr.skip())
        return (f"Downloaded {_names(wanted, '`')}.", current, model, gr.Tabs(selected=generate_tab_id),
                gr.update(visible=False))

    fetch.click(download, [wanted, target.loras], [note, target.loras, target.model, tabs, fetch],
                api_visibility="private", show_progress_on=note)
