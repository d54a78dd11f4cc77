"""GenerationParams -> images + infotext. No gradio here: the CLI and the UI both call ``generate``.

Stages: check_inputs -> seeds/generators -> scheduler -> denoise (the diffusers pipeline, latents out) -> decode
(with an fp32 retry that guards fp16 VAEs against NaN/black images) -> infotext.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from PIL import Image

from . import __version__
from .infotext import Infotext
from .models import LoadedModel
from .prompts import PromptEncoder, WeightedPrompt, needs_encoding, parse_attention
from .preview import fit_preview_map, latents_to_preview
from .sampling.registry import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES, make_scheduler, resolve_schedule

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_BATCH = 8
MAX_CLIP_SKIP = 12  # A1111's slider; the loaded model's text encoder may allow fewer (check_inputs)
# A1111 sets no limit and real prompts stay under a few thousand characters; 100 000 held the slot for a minute.
MAX_PROMPT = 8000


def _f(default, help: str, flag: str | None = None, **kw):
    """A dataclass field whose help text and CLI flag live next to its default (the CLI is generated from them)."""
    return field(default=default, metadata={"help": help, "flag": flag, **kw})


@dataclass
class GenerationParams:
    prompt: str = _f("", "what to draw")
    negative_prompt: str = _f("", "what to avoid")
    steps: int | None = _f(None, f"denoising steps, 1-{MAX_STEPS} (default: what the model card recommends, else "
                                 f"A1111's 20)", type=int)
    guidance_scale: float | None = _f(None, "CFG scale: how strongly to follow the prompt (0 = ignore it; default: "
                                         "what the model card recommends, else 7)", flag="--guidance", type=float)
    width: int | None = _f(None, "image width in px, multiple of 8 (default: the model's native size)")
    height: int | None = _f(None, "image height in px, multiple of 8 (default: the model's native size)")
    seed: int = _f(-1, "random seed; -1 picks one at random (the used seed is reported)")
    sampler: str | None = _f(None, f"sampler, A1111 names (default: what the model card recommends, else "
                                   f"{DEFAULT_SAMPLER})", choices=list(SAMPLERS), type=str)
    schedule: str = _f("Automatic", "noise schedule type (A1111 'Schedule type')", choices=list(SCHEDULES))
    batch_size: int = _f(1, f"images per run, 1-{MAX_BATCH}; image i uses seed+i", flag="--batch")
    clip_skip: int = _f(1, "use the text encoder's N-th last layer (1 = last, A1111 numbering)")
    cfg_cutoff: float = _f(1.0, "fast: after this fraction of the steps, drop the negative prompt's pass (CFG then "
                                "ends); 1 = never; 0.6 saves about a fifth of the time", type=float)

    def validate(self) -> "GenerationParams":
        """Raise ValueError naming the field for anything a user must change; return a copy whose numbers have
        their field's type (an API's 512.0 is 512; 64.5 is refused, never truncated)."""
        def bad(name: str, why: str):
            raise ValueError(f"{name}: {why}")

        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        p = replace(self, steps=_whole("steps", self.steps, optional=True), seed=_whole("seed", self.seed),
                    width=_whole("width", self.width, optional=True),
                    height=_whole("height", self.height, optional=True),
                    guidance_scale=_number("guidance_scale", self.guidance_scale, optional=True),
                    batch_size=_whole("batch_size", self.batch_size), clip_skip=_whole("clip_skip", self.clip_skip),
                    cfg_cutoff=_number("cfg_cutoff", self.cfg_cutoff))
        if p.steps is not None and not 1 <= p.steps <= MAX_STEPS:
            bad("steps", f"{p.steps} is out of range; use 1 to {MAX_STEPS}")
        if not 0 <= p.cfg_cutoff <= 1:
            bad("cfg_cutoff", f"{p.cfg_cutoff:g} is out of range; use 0 to 1 (1 = off)")
        if p.guidance_scale is not None and not 0 <= p.guidance_scale <= 50:
            bad("guidance_scale", f"{p.guidance_scale:g} is out of range; use 0 to 50")
        for name in ("width", "height"):
            v = getattr(p, name)
            if v is not None and (v <= 0 or v > MAX_SIDE or v % 8):
                bad(name, f"{v} px is not allowed; use a multiple of 8 between 8 and {MAX_SIDE}")
        if not (p.seed == -1 or 0 <= p.seed <= MAX_SEED):
            bad("seed", f"{p.seed} is out of range; use -1 (random) or 0 to {MAX_SEED}")
        if not 1 <= p.batch_size <= MAX_BATCH:
            bad("batch_size", f"{p.batch_size} is out of range; use 1 to {MAX_BATCH}")
        if not 1 <= p.clip_skip <= MAX_CLIP_SKIP:
            bad("clip_skip", f"{p.clip_skip} is out of range; use 1 to {MAX_CLIP_SKIP}")
        for name, names in (("sampler", SAMPLERS), ("schedule", SCHEDULES)):
            value = getattr(p, name)
            if value is not None and not isinstance(value, str):
                bad(name, "must be text (a name from the list)")
            if value and value not in names:  # checked here to quote it on one line, short (a pasted page was not)
                bad(name, f"unknown {_shown(value)}; choose one of {', '.join(names)}")
        resolve_schedule(p.sampler or DEFAULT_SAMPLER, p.schedule)  # a None schedule -> ValueError naming it
        return p


def _check_text(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be text")
    if len(value) > MAX_PROMPT:
        raise ValueError(f"{name}: {len(value)} characters is too long; at most {MAX_PROMPT}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, which JSON can carry: the tokenizer cannot read it
        raise ValueError(f"{name}: character {exc.start + 1} ({value[exc.start]!r}) is not valid Unicode text; "
                         "remove it") from None


def _shown(value) -> str:
    """A value as a message quotes it: one line (repr escapes newlines), at most 60 characters of it."""
    if isinstance(value, int) and value.bit_length() > 64:  # repr() of a 5000-digit int raises ValueError
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _number(name: str, value, optional: bool = False) -> float | None:
    """A finite float from a number or its text (API callers send either); ValueError naming the field."""
    if value is None and optional:
        return None
    if value is None:
        raise ValueError(f"{name}: missing; give a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an int past a float's range
        raise ValueError(f"{name}: {_shown(value)} is out of range") from None
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name}: {_shown(value)} is not a number")
    return number


def _whole(name: str, value, optional: bool = False) -> int | None:
    """An int from an int, a whole float (JSON's 512.0) or its text; a fraction is refused, never truncated."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:  # no field goes this far; the range messages below would print all its digits
            raise ValueError(f"{name}: {_shown(value)} is out of range")
        return value
    number = _number(name, value, optional)
    if number is None:
        return None
    if number != int(number):
        raise ValueError(f"{name}: {_shown(value)} is not a whole number")
    return int(number)


def param_fields():
    """(name, default, metadata) of every GenerationParams field, for the CLI and the UI."""
    return [(f.name, f.default, f.metadata) for f in fields(GenerationParams)]


@dataclass
class StepEvent:
    step: int  # 1-based, counts scheduler iterations (2nd-order samplers run ~2x steps)
    total: int
    elapsed: float  # seconds since the denoising loop started
    previews: list[Image.Image] | None = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[Infotext]
    seeds: list[int]
    interrupted_at: int | None = None  # step at which a Stop arrived, None when the run completed
    warnings: list[str] = field(default_factory=list)  # how a malformed prompt was read (shown to the user)
    seconds: float = 0.0


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if int(seed) == -1 else int(seed)


def check_inputs(model: LoadedModel, params: GenerationParams) -> GenerationParams:
    """Validated params with the model's defaults filled in; clip skip is checked against this model's depth."""
    p = params.validate()
    if p.clip_skip > model.max_clip_skip:
        raise ValueError(f"clip_skip: {p.clip_skip} is out of range for this model (its text encoder is shallower); "
                         f"use 1 to {model.max_clip_skip}")
    size = model.default_size
    return replace(
        p,
        width=p.width or size,
        height=p.height or size,
        seed=resolve_seed(p.seed),
        steps=p.steps or model.default_steps,
        guidance_scale=model.default_guidance if p.guidance_scale is None else p.guidance_scale,
        sampler=p.sampler or model.default_sampler,
    )


def make_generators(seed: int, n: int) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise, hence the same image, on CPU, CUDA and MPS.
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


# The pipeline's tensors that carry CFG's two halves (negative first), per family: halved when CFG ends early.
_CFG_TENSORS = {"sdxl": ["prompt_embeds", "add_text_embeds", "add_time_ids"]}


def _cfg_tensors(family: str) -> list[str]:
    return _CFG_TENSORS.get(family, ["prompt_embeds"])


def _step_callback(model: LoadedModel, on_step, cancel, preview_every: int, state: dict, cfg_until: int | None):
    t0 = time.perf_counter()

    def callback(pipe, i, t, kwargs):
        if cfg_until is not None and i + 1 == cfg_until and pipe.do_classifier_free_guidance:
            # A1111's "negative guidance minimum sigma" by step count (diffusers' dynamic-CFG recipe): the rest of
            # the steps run the prompt's half alone, at one pass a step instead of two
            pipe._guidance_scale = 0.0
            for name in _cfg_tensors(model.family):
                kwargs[name] = kwargs[name].chunk(2)[-1]
        if on_step is not None:
            total = len(pipe.scheduler.timesteps)
            previews = None
            if preview_every and ((i + 1) % preview_every == 0) and i + 1 < total:
                if model.preview_map is None:
                    model.preview_map = fit_preview_map(pipe.vae)
                previews = latents_to_preview(kwargs["latents"], model.preview_map)
            on_step(StepEvent(i + 1, total, time.perf_counter() - t0, previews))
        if cancel is not None and cancel.is_set() and state.get("interrupted_at") is None:
            state["interrupted_at"] = i + 1
            pipe._interrupt = True  # diffusers skips the remaining steps and returns the current latents
        return kwargs

    return callback


def denoise(model: LoadedModel, p: GenerationParams, pos: WeightedPrompt, neg: WeightedPrompt, generators,
            callback) -> torch.Tensor:
    """Run the diffusers pipeline's loop and return latents (B, 4, H/8, W/8)."""
    kwargs = dict(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt or None,
        num_inference_steps=p.steps,
        guidance_scale=p.guidance_scale,
        width=p.width,
        height=p.height,
        num_images_per_prompt=p.batch_size,
        generator=generators,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents"] + (_cfg_tensors(model.family) if p.cfg_cutoff < 1 else []),
    )
    sdxl = model.family == "sdxl"
    if needs_encoding([pos, neg], model.pipe.tokenizer, p.clip_skip, sdxl):
        # Weights, long prompts, SD clip skip: compel-based encoding (prompts.py) hands the pipeline embeddings.
        del kwargs["prompt"], kwargs["negative_prompt"]
        if p.clip_skip not in model.prompt_encoders:  # keeps compel's cached empty-prompt encoding between runs
            model.prompt_encoders[p.clip_skip] = PromptEncoder(model.pipe, p.clip_skip, sdxl)
        kwargs.update(model.prompt_encoders[p.clip_skip].pipeline_kwargs(pos, neg, not p.negative_prompt))
    else:
        # Plain prompts: the pipeline's own encoding, so images equal stock diffusers bit for bit. Escapes like
        # "\(" are resolved by the parser, hence the joined text rather than the raw prompt.
        kwargs["prompt"] = "".join(t for t, _ in pos.chunks[0])
        kwargs["negative_prompt"] = "".join(t for t, _ in neg.chunks[0]) or None
        if p.clip_skip > 1:  # only SDXL gets here: its diffusers clip-skip path works with transformers 5
            kwargs["clip_skip"] = p.clip_skip - 1  # A1111 counts the last layer as 1; diffusers counts skipped ones
    return model.pipe(**kwargs).images


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode (B, 4, h, w) latents to PIL images, retrying in fp32 when fp16 overflows to NaN."""
    vae = model.pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # the SDXL VAE is known to overflow in fp16: upcast once and keep it
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        m, s = torch.tensor(mean).view(shape), torch.tensor(std).view(shape)
        latents = latents * s.to(latents) / vae.config.scaling_factor + m.to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if not torch.isfinite(image).all() and vae.dtype != torch.float32:
        log.warning("VAE decode gave NaN in %s; upcasting the VAE to fp32 and decoding again", vae.dtype)
        vae.to(torch.float32)
        image = vae.decode(latents.float(), return_dict=False)[0]
    return model.pipe.image_processor.postprocess(image, output_type="pil")


def make_infotext(model: LoadedModel, p: GenerationParams, seed: int) -> Infotext:
    params = {
        "Steps": p.steps,
        "Sampler": p.sampler,
        "Schedule type": resolve_schedule(p.sampler, p.schedule),
        "CFG scale": p.guidance_scale,
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model": model.ref.public_name,
    }
    if p.clip_skip > 1:
        params["Clip skip"] = p.clip_skip
    if p.cfg_cutoff < 1:
        params["CFG cutoff"] = p.cfg_cutoff
    params["Version"] = f"sd_demo {__version__}"
    return Infotext(p.prompt, p.negative_prompt, params)


def generate(
    model: LoadedModel,
    params: GenerationParams,
    *,
    on_step: Callable[[StepEvent], None] | None = None,
    cancel: threading.Event | None = None,
    preview_every: int = 5,
) -> GenerationResult:
    """Generate ``params.batch_size`` images; image i uses seed+i. Stop via ``cancel`` returns what was reached."""
    p = check_inputs(model, params)
    t0 = time.perf_counter()
    state: dict = {}
    with model.lock:  # one job at a time per pipeline: the scheduler below is pipeline state
        key = (p.sampler, p.schedule)
        if key not in model.schedulers:  # built once per pair; set_timesteps resets its state each run
            model.schedulers[key] = make_scheduler(p.sampler, p.schedule, model.base_scheduler_config)
        model.pipe.scheduler = model.schedulers[key]
        cfg_until = max(1, round(p.steps * p.cfg_cutoff)) if p.cfg_cutoff < 1 else None
        callback = _step_callback(model, on_step, cancel, preview_every, state, cfg_until)
        pos, neg = parse_attention(p.prompt), parse_attention(p.negative_prompt)
        latents = denoise(model, p, pos, neg, make_generators(p.seed, p.batch_size), callback)
        images = decode(model, latents)
    seeds = [p.seed + i for i in range(p.batch_size)]
    return GenerationResult(
        images=images,
        infotexts=[make_infotext(model, p, s) for s in seeds],
        seeds=seeds,
        interrupted_at=state.get("interrupted_at"),
        warnings=[f"prompt: {w}" for w in pos.warnings] + [f"negative prompt: {w}" for w in neg.warnings],
        seconds=time.perf_counter() - t0,
    )


# A1111 infotext keys -> GenerationParams fields, for "send to Generate" from a PNG.
_INFOTEXT_FIELDS = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Clip skip": ("clip_skip", int),
    "CFG cutoff": ("cfg_cutoff", float),
}


def params_from_infotext(info: Infotext) -> tuple[GenerationParams, list[str]]:
    """Parameters found in an infotext, plus the names of keys we could not use (shown to the user)."""
    values: dict = {"prompt": info.prompt, "negative_prompt": info.negative_prompt}
    ignored = []
    for key, value in info.params.items():
        if key in _INFOTEXT_FIELDS:
            name, conv = _INFOTEXT_FIELDS[key]
            try:
                values[name] = conv(value)
            except (TypeError, ValueError):
                ignored.append(key)
        elif key == "Size" and info.size:
            values["width"], values["height"] = info.size
        elif key not in ("Model", "Model hash", "Version", "Lora"):  # the model and LoRAs: engine.locate_*
            ignored.append(key)
    sampler = values.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        # A1111 before 1.6 wrote the schedule into the sampler name: "DPM++ 2M Karras".
        base, _, sched = sampler.rpartition(" ")
        if base in SAMPLERS and sched in SCHEDULES and "schedule" not in values:
            values["sampler"], values["schedule"] = base, sched
        else:
            ignored.append(f"Sampler ({values.pop('sampler')})")
    if values.get("schedule") not in SCHEDULES and "schedule" in values:
        ignored.append(f"Schedule type ({values.pop('schedule')})")
    return GenerationParams(**values), ignored
