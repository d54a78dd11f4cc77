"""The img2img tab: image to image, and inpainting where the picture is painted over. Only widgets and wiring: the
work is sd_demo.generate's (through the engine), the mask is read by sd_demo.img2img."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ..engine import Engine, ModelDefaults
from ..generate import DEFAULT_STRENGTH, MAX_MASK_BLUR, GenerationParams
from ..img2img import MASKED_CONTENT, RESIZE_MODES, mask_from_layers
from ..infotext import parse_infotext
from ..models import DEFAULT_GUIDANCE
from ..sampling.registry import DEFAULT_SAMPLER
from .generate import (GenerateTab, UserError, checked, gallery_item, on_gpu, results_gallery, run_events,
                       sampling_controls, stream, wire_run_controls)

INPAINT_AREAS = ("Whole picture", "Only masked")  # A1111's "Inpaint area"


def _preprocessed(component, raw, name: str):
    """A component's value from the raw payload a ``preprocess=False`` handler gets (gradio has already moved and
    checked its files), or gr.Error naming the field when it is not an image."""
    if not raw:
        return None
    try:
        return component.preprocess(component.data_model.model_validate(raw))
    except Exception as exc:  # pydantic's ValidationError, PIL's UnidentifiedImageError, a decompression bomb
        raise UserError(f"{name}: not a readable image ({type(exc).__name__})") from None


def _pictures(editor: gr.ImageEditor, upload: gr.Image, raw_editor, raw_mask) -> tuple:
    """(init image, mask) from the editor's raw payload (its background; strokes painted on it are the mask) and
    an uploaded mask, which wins over strokes; gr.Error when there is no picture."""
    value = _preprocessed(editor, raw_editor, "init_image")
    init = value.get("background") if value else None
    if init is None:
        raise UserError("init_image: upload or paste a picture first")
    mask = _preprocessed(upload, raw_mask, "mask")
    if mask is None:
        mask = mask_from_layers(value.get("layers") or [])
    return init, mask


def make_img2img_fn(engine: Engine, public: bool, editor: gr.ImageEditor, upload: gr.Image):
    def img2img(
        image,
        mask=None,
        prompt: str = "",
        negative_prompt: str = "",
        sampler: str | None = None,
        schedule: str = GenerationParams.schedule,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int = -1,
        batch_size: int = 1,
        strength: float | None = DEFAULT_STRENGTH,
        resize_mode: str = GenerationParams.resize_mode,
        mask_blur: int = GenerationParams.mask_blur,
        masked_content: str = GenerationParams.masked_content,
        inpaint_area: str = INPAINT_AREAS[0],
        only_masked_padding: int = GenerationParams.only_masked_padding,
        model: str | None = None,
        loras: str = "",
        fast: bool = GenerationParams.fast,
        visitor: str | None = None,  # a gr.State (not an API argument): whose training results are usable
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Image to image, and inpainting with a mask: redraws a picture after the prompt; yields live previews,
        then the PNGs (each with its A1111 parameters) in a gallery, a preview, a status line and the parameters.

        Args:
            image: The picture to start from (an image editor's value: its background; strokes are a mask).
            mask: Inpainting: where to redraw, white on black; empty for image to image (or the strokes).
            prompt: What the result shows.
            negative_prompt: What it should not show.
            sampler: An A1111 sampler name; empty for the model's recommended one.
            schedule: The noise schedule ("Automatic", "Karras", ...).
            steps: Denoising steps of a whole schedule (strength 0.75 runs three quarters of them); empty for the
                model's count.
            guidance_scale: Classifier-free guidance scale; empty for the model's recommended one.
            width: Output width (multiple of 8); 0 or empty for the model's size at the picture's aspect.
            height: Output height (multiple of 8); 0 or empty for the model's size at the picture's aspect.
            seed: Random seed; -1 for a random one. Image i of a batch uses seed + i.
            batch_size: Images to make, 1 to 8.
            strength: Denoising strength, 0 (the picture as it is) to 1 (ignore it).
            resize_mode: "Just resize", "Crop and resize" or "Resize and fill".
            mask_blur: Inpainting: blur of the mask's edge in pixels.
            masked_content: Inpainting: "original", "fill", "latent noise" or "latent nothing".
            inpaint_area: Inpainting: "Whole picture", or "Only masked" (redrawn at width x height, pasted back).
            only_masked_padding: Inpainting, only masked: pixels of context around the mask.
            model: A model from the app's list; empty for the loaded one.
            loras: LoRAs to apply, "source[:scale], ..." (a training run's name, a file or folder, a Hub repo id);
                empty for none.
            fast: 2-4x faster for a little less detail (the Generate tab's Fast: Deep cache, CFG cutoff and,
                where it pays, bf16 autocast).
        """
        init, mask_image = _pictures(editor, upload, image, mask)
        model, lora_list, params = checked(
            engine, public, visitor, model, loras, prompt=prompt or "", negative_prompt=negative_prompt or "",
            steps=steps, guidance_scale=guidance_scale, width=width, height=height, seed=seed, sampler=sampler,
            schedule=schedule, batch_size=batch_size, strength=strength, resize_mode=resize_mode,
            mask_blur=mask_blur, masked_content=masked_content, only_masked=inpaint_area == INPAINT_AREAS[1],
            only_masked_padding=only_masked_padding, fast=fast)
        yield from stream(engine, params, model, lora_list, request, progress, init_image=init, mask=mask_image,
                          public=public, visitor=visitor)

    return on_gpu(engine, public, img2img)


def build(engine: Engine, gen: GenerateTab, tabs: gr.Tabs, tab_id: str, public: bool = False,
          visitor: gr.State | None = None) -> Img2imgTab:
    """Lay out the tab and wire its events (and the Generate tab's "Send to img2img"); call inside gr.Blocks."""
    visitor = visitor if visitor is not None else gr.State(None)
    try:
        d = engine.defaults()
    except ValueError:
        d = ModelDefaults("", 512, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, 1)
    with gr.Row():
        with gr.Column(scale=5):
            editor = gr.ImageEditor(label="Image: paint over what to redraw (inpainting), or leave it as it is",
                                    type="pil", sources=["upload", "clipboard"], layers=False, format="png",
                                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), height=420,
                                    elem_id="img2img-image")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="img2img-prompt")
            negative = gr.Textbox("", label="Negative prompt", lines=1)
            with gr.Row():
                strength = gr.Slider(0, 1, value=DEFAULT_STRENGTH, step=0.01, label="Denoising strength",
                                     info="0 = the picture as it is, 1 = ignore it", elem_id="img2img-strength")
                resize_mode = gr.Radio(list(RESIZE_MODES), value=GenerationParams.resize_mode, label="Resize mode")
            c = sampling_controls(d, size_info="0 = the model's size at the picture's aspect")
            with gr.Accordion("Inpainting", open=False):
                mask = gr.Image(label="Mask (optional): white = redraw; replaces the strokes", type="pil",
                                image_mode="L", sources=["upload"], height=160, elem_id="img2img-mask")
                with gr.Row():
                    mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=GenerationParams.mask_blur, step=1,
                                          label="Mask blur")
                    masked_content = gr.Radio(list(MASKED_CONTENT), value=GenerationParams.masked_content,
                                              label="Masked content")
                with gr.Row():
                    area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area")
                    padding = gr.Slider(0, 256, value=GenerationParams.only_masked_padding, step=4,
                                        label="Only masked padding, pixels")
        with gr.Column(scale=6):
            with gr.Row():
                run_btn = gr.Button("Generate", variant="primary", elem_id="img2img-btn")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="img2img-stop")
            gallery = results_gallery("img2img-gallery")
            preview = gr.Image(label="Live preview", interactive=False, height=160)
            status = gr.Markdown("", elem_id="img2img-status")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                  elem_id="img2img-infotext")
    infos = gr.State([])
    inputs = [editor, mask, prompt, negative, c.sampler, c.schedule, c.steps, c.cfg, c.width, c.height, c.seed,
              c.batch, strength, resize_mode, mask_blur, masked_content, area, padding, gen.model, gen.loras, c.fast,
              visitor]
    outputs = [gallery, preview, status, infotext, infos]
    handler = make_img2img_fn(engine, public, editor, mask)
    run_btn.click(handler, inputs, outputs, api_name="img2img", **run_events(gallery))  # queued, as Generate's
    prompt.submit(handler, inputs, outputs, api_visibility="private", **run_events(gallery))
    wire_run_controls(engine, c, stop_btn, gallery, infos, infotext)

    def model_defaults():
        """The sampler, steps and CFG scale of the model the Generate tab has just loaded."""
        try:
            d = engine.defaults()
        except ValueError:
            return gr.skip(), gr.skip(), gr.skip()
        return d.sampler, d.steps, d.guidance

    gen.loaded.change(model_defaults, None, [c.sampler, c.steps, c.cfg], api_visibility="private")

    here = Img2imgTab([editor, prompt, negative, c.sampler, c.cfg, c.seed, tabs], tab_id)
    gen.send_img2img.click(lambda images, texts, index: here.values(*gallery_item(images, texts, index)),
                           [gen.gallery, gen.infos, gen.picked], here.targets, api_visibility="private")
    return here


@dataclass
class Img2imgTab:
    """What "Send to img2img" (Generate, PNG Info, History) writes: the picture and its prompt, negative prompt,
    sampler, CFG and seed, then this tab is shown."""

    targets: list  # editor, prompt, negative prompt, sampler, CFG, seed, and the gr.Tabs to switch
    tab_id: str

    def values(self, path: str | None, text: str | None) -> tuple:
        """The targets' values for a picture file and its parameters text (None: the picture alone)."""
        if not path:
            raise UserError("pick an image first")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception:  # gone from the disk, or not an image
            raise UserError("Send to img2img: that file is not a readable image") from None
        editor_value = {"background": image, "layers": [], "composite": image}
        if not text:
            return (editor_value, *[gr.skip()] * 5, gr.Tabs(selected=self.tab_id))
        info = parse_infotext(text)
        p = info.params
        return (editor_value, info.prompt, info.negative_prompt, p.get("Sampler", gr.skip()),
                p.get("CFG scale", gr.skip()), p.get("Seed", gr.skip()), gr.Tabs(selected=self.tab_id))
