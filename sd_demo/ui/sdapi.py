"""A1111's web API (``/sdapi/v1/...``) on the app, for the tools written against it (Open WebUI, SillyTavern,
Krita plugins, scripts): txt2img and img2img through the engine's queue beside the tabs' runs, and the lists a
client reads first (samplers, schedulers, models, options). It bypasses gradio's queue and event stream, so a
request costs what the call costs in-process plus one HTTP round trip (issue 19; BENCHMARKS.md).

Fields a request leaves out follow the model (its native size, its card's sampler, CFG scale and steps), as in the
Generate tab, not A1111's fixed 512 px and 50 steps. A field we cannot honour with a value other than its default
(``restore_faces``, ``tiling``, scripts, ...) is refused by name; the rest of A1111's fields are ignored. The
handlers take and return plain values; ``mount`` wires them as FastAPI routes.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import zerogpu
from ..engine import Engine
from ..generate import GenerationParams, _whole
from ..img2img import RESIZE_MODES, check_size
from ..infotext import format_infotext
from ..runqueue import RUNNING
from ..sampling.registry import SAMPLERS, SCHEDULES
from .generate import user_error

PREFIX = "/sdapi/v1"
# whose queue and history the API's runs join: a name no browser session or visitor id can take (both are chosen by
# the client), so no tab shows or stops them
OWNER = f"sdapi-{secrets.token_hex(8)}"
# A1111's fields that change the picture in ways this app does not do: refused when set, else ignored
UNSUPPORTED = ("restore_faces", "tiling", "script_name", "alwayson_scripts", "subseed_strength", "refiner_checkpoint")
# A1111's numbers for inpainting_fill and resize_mode, as our names (its resize_mode 3, a latent upscale, is not ours)
FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
RESIZE = dict(enumerate(RESIZE_MODES))
# A1111's request fields -> GenerationParams': always, with enable_hr, for img2img; override_settings honoured
FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "guidance_scale",
          "width": "width", "height": "height", "seed": "seed", "sampler_name": "sampler", "scheduler": "schedule",
          "batch_size": "batch_size"}
HIRES_FIELDS = {"hr_scale": "hires_scale", "hr_upscaler": "hires_upscaler", "hr_second_pass_steps": "hires_steps",
                "hr_resize_x": "hires_width", "hr_resize_y": "hires_height", "denoising_strength": "strength"}
IMG2IMG_FIELDS = {"denoising_strength": "strength", "mask_blur": "mask_blur", "inpaint_full_res": "only_masked",
                  "inpaint_full_res_padding": "only_masked_padding"}
OPTION_FIELDS = {"CLIP_stop_at_last_layers": "clip_skip"}
A1111_NAME = {ours: theirs for table in (FIELDS, HIRES_FIELDS, IMG2IMG_FIELDS) for theirs, ours in table.items()}
A1111_NAME["clip_skip"] = "override_settings.CLIP_stop_at_last_layers"


def _refuse_unsupported(body: dict) -> None:
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0, "", [], {}):
            raise ValueError(f"{name}: not supported by this app; leave it out")
    if (_whole("n_iter", body.get("n_iter"), optional=True) or 1) != 1:
        raise ValueError("n_iter: one batch per request here; use batch_size (up to 8) or send more requests")


def _image(data, field: str):
    """A PIL image from A1111's base64 (plain, or a data URL), its size checked before its pixels are decoded."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"{field}: expected a base64-encoded PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data.partition(",")[2] if data.startswith("data:") else data)))
        check_size(image, field)
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError(f"{field}: not a base64-encoded image") from None
    return image


def params_of(body: dict, img2img: bool) -> tuple[GenerationParams, str | None]:
    """(validated params, model selector value or None) of an A1111 txt2img / img2img body; a bad value raises
    ValueError naming A1111's field."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object (Content-Type: application/json)")
    _refuse_unsupported(body)
    options = body.get("override_settings") or {}
    if not isinstance(options, dict):
        raise ValueError("override_settings: expected an object")
    fields = {**FIELDS, **(IMG2IMG_FIELDS if img2img else HIRES_FIELDS if body.get("enable_hr") else {})}
    values = {ours: body[theirs] for theirs, ours in fields.items() if body.get(theirs) is not None}
    values.update({ours: options[theirs] for theirs, ours in OPTION_FIELDS.items() if theirs in options})
    if "sampler" not in values and body.get("sampler_index"):  # A1111's older name
        values["sampler"] = body["sampler_index"]
    for ours, names in (("sampler", SAMPLERS), ("schedule", SCHEDULES)):  # A1111 takes "karras" for "Karras"
        if isinstance(values.get(ours), str):
            values[ours] = {n.lower(): n for n in names}.get(values[ours].lower(), values[ours])
    if img2img:
        fill, resize = body.get("inpainting_fill", 0), body.get("resize_mode", 0)
        for name, value, allowed in (("inpainting_fill", fill, FILL), ("resize_mode", resize, RESIZE)):
            if value not in allowed:
                raise ValueError(f"{name}: use one of {', '.join(f'{k} ({v})' for k, v in allowed.items())}")
        values.update(resize_mode=RESIZE[resize], masked_content=FILL[fill])
        values.setdefault("only_masked", True)  # A1111's API defaults (its UI's differ: whole picture, padding 32)
        values.setdefault("only_masked_padding", 0)
    elif body.get("enable_hr"):
        values.setdefault("hires_scale", 2.0)  # A1111's default factor (ours: 1, off)
    try:
        return GenerationParams(**values).validate(), options.get("sd_model_checkpoint") or None
    except (TypeError, ValueError) as exc:
        ours, sep, why = str(exc).partition(":")
        raise ValueError(f"{A1111_NAME.get(ours, ours)}{sep}{why}") from None


def generate(engine: Engine, body: dict, img2img: bool, public: bool, key: str) -> dict:
    """A1111's answer to a txt2img / img2img body: the PNGs (base64, each with its parameters), the request (its
    pictures left out, as A1111 does), and ``info``, a JSON text of what was used. ``key``: the run's Stop key.
    Bad input raises ValueError naming the field."""
    params, model = params_of(body, img2img)
    init = mask = None
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise ValueError("init_images: give one base64-encoded image")
        init = _image(images[0], "init_images")  # generate() fits it and the mask (img2img.check_source)
        if body.get("mask"):
            mask = _image(body["mask"], "mask")
            if body.get("inpainting_mask_invert"):
                mask = ImageOps.invert(mask.convert("L"))
    *_, done = engine.run(params, model=engine.chosen_model(model, public), job=key, init_image=init, mask=mask,
                          owner=OWNER, public=public)
    if done.result is None:
        raise ValueError(done.waiting or "the job was cancelled before it started")
    result = done.result
    used = result.infotexts[0].params
    info = {"prompt": params.prompt, "all_prompts": [params.prompt] * len(result.seeds),
            "negative_prompt": params.negative_prompt, "seed": result.seeds[0], "all_seeds": result.seeds,
            "width": result.images[0].width, "height": result.images[0].height, "sampler_name": used.get("Sampler"),
            "scheduler": used.get("Schedule type"), "cfg_scale": used.get("CFG scale"), "steps": used.get("Steps"),
            "batch_size": len(result.seeds), "sd_model_name": used.get("Model"),
            "infotexts": [format_infotext(i) for i in result.infotexts]}
    return {"images": [base64.b64encode(Path(p).read_bytes()).decode() for p in done.paths],
            "parameters": {k: v for k, v in body.items() if k not in ("init_images", "mask")},
            "info": json.dumps(info)}


def samplers() -> list[dict]:
    return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]


def schedulers() -> list[dict]:
    return [{"name": name, "label": name} for name in SCHEDULES]


def models(engine: Engine, public: bool) -> list[dict]:
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
            for name in engine.model_choices(public)]


def options(engine: Engine, public: bool) -> dict:
    return {"sd_model_checkpoint": engine.current_choice(public)}


def interrupt(engine: Engine) -> dict:
    """Stop the API's running job after its current step (A1111's interrupt; the waiting ones stay queued)."""
    for job, _ in engine.queued(OWNER, public=True):
        if job.state == RUNNING:
            engine.cancel_queued(job.id, OWNER, public=True)
    return {}


def mount(app, engine: Engine, public: bool, logins: list[tuple[str, str]] | None, max_bytes: int) -> None:
    """Add the routes to the app's FastAPI ``app``. With logins (``--auth``), each request must carry one of them
    as HTTP Basic credentials (A1111's ``--api-auth``); gradio's own login does not cover these routes. A browser
    page of another site may not call them (its Origin is refused), nor may a body larger than ``max_bytes``."""
    basic = HTTPBasic(auto_error=False)

    def guard(request: Request, credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            # a page elsewhere posting into a local app: a text/plain POST needs no preflight
            raise HTTPException(403, "this API takes no requests from other sites' pages")
        if logins and not (credentials and any(
                secrets.compare_digest(credentials.username.encode(), user.encode())
                & secrets.compare_digest(credentials.password.encode(), pw.encode()) for user, pw in logins)):
            raise HTTPException(401, "this app needs a login: send one of its --auth pairs as HTTP Basic",
                                headers={"WWW-Authenticate": "Basic"})

    async def json_body(request: Request):
        """The body as JSON, read no further than ``max_bytes``; None when it is not JSON (A1111's clients send
        application/json; a page of another site can send text/plain without asking first)."""
        if request.headers.get("content-type", "").partition(";")[0].strip().lower() != "application/json":
            return None
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_bytes:
                raise HTTPException(413, f"the request is over this app's upload limit of {max_bytes // 2**20} MB")
        try:
            return json.loads(data)
        except ValueError:
            return None

    def run(body, img2img: bool):
        if zerogpu.active():  # the GPU is lent per gradio event there; these routes are not one
            return JSONResponse({"error": "NotAvailable", "detail": "on a ZeroGPU Space, use gradio's API "
                                 "(/generate, /img2img) instead of A1111's"}, status_code=503)
        try:  # a Stop key of its own, which no browser session can name
            return generate(engine, body, img2img, public, f"{OWNER}:{secrets.token_hex(8)}")
        except Exception as exc:  # one line, as the tabs show it (a ValueError is the caller's to fix)
            return JSONResponse({"error": type(exc).__name__, "detail": user_error(exc).message},
                                status_code=422 if isinstance(exc, ValueError) else 500)

    def txt2img(body=Depends(json_body)):
        return run(body, False)

    def img2img(body=Depends(json_body)):
        return run(body, True)

    routes = [("POST", "/txt2img", txt2img), ("POST", "/img2img", img2img),
              ("GET", "/samplers", samplers), ("GET", "/schedulers", schedulers),
              ("GET", "/sd-models", lambda: models(engine, public)),
              ("GET", "/options", lambda: options(engine, public))]
    if not public:  # on a public app one visitor would stop the others' runs
        routes.append(("POST", "/interrupt", lambda: interrupt(engine)))
    for method, path, fn in routes:
        app.add_api_route(PREFIX + path, fn, methods=[method], dependencies=[Depends(guard)])
