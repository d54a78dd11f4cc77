"""GenerationParams -> images + infotext. No gradio here: the CLI and the UI both call ``generate``.

Stages: check_inputs -> seeds/generators -> scheduler -> denoise (the diffusers pipeline, latents out) -> decode
(with an fp32 retry that guards fp16 VAEs against NaN/black images) -> infotext.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
from PIL import Image

from . import __version__, img2img
from .img2img import HIRES_UPSCALERS, MASKED_CONTENT, RESIZE_MODES
from .deepcache import feature_cache
from .infotext import Infotext
from .models import TINY_VAE_DIR, LoadedModel, autocast_run, compiled_run, load_tiny_vae
from .prompts import PromptEncoder, WeightedPrompt, needs_encoding, parse_attention
from .preview import fit_preview_map, latents_to_preview
from .sampling.registry import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES, make_scheduler, resolve_schedule

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_BATCH = 8
MAX_CLIP_SKIP = 12  # A1111's slider; the loaded model's text encoder may allow fewer (check_inputs)
DEFAULT_STRENGTH = 0.75  # A1111's img2img denoising strength
DEFAULT_HIRES_STRENGTH = 0.7  # A1111's hires fix denoising strength
MAX_MASK_BLUR = 64  # A1111's slider
MAX_HIRES_SCALE = 4.0  # A1111's slider
# A1111 sets no limit and real prompts stay under a few thousand characters; 100 000 held the slot for a minute.
MAX_PROMPT = 8000
# Live previews decode with the VAE itself up to this size of decoder (the embedded model's: 0.6 M, 14 ms at 128 px;
# SD's: 49 M, seconds on a CPU)
PREVIEW_DECODER_PARAMS = 5_000_000
MAX_DEEP_CACHE = 10  # DeepCache's paper goes to 10; past it the reused features are many steps old
# The Fast choice: switches left off take these values (each measured on its own in BENCHMARKS.md, issue 19)
# (autocast only where it pays: LoadedModel.autocast_pays)
FAST = {"deep_cache": 3, "cfg_cutoff": 0.6, "autocast": True}
FAST_TEXT = f"Deep cache {FAST['deep_cache']}, CFG cutoff {FAST['cfg_cutoff']} and, where it pays, bf16 autocast"


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
    # The speed switches (speed=True, in this order: SPEED): the UI's, the evaluator's flags, a picture's read-back
    cfg_cutoff: float = _f(1.0, "fast: after this fraction of the steps, drop the negative prompt's pass (CFG then "
                                "ends); 1 = never; 0.6 saves about a fifth of the time", type=float, speed=True)
    deep_cache: int = _f(1, f"fast: run the UNet's deep blocks on every N-th step only and reuse their features in "
                            f"between (DeepCache), 1-{MAX_DEEP_CACHE}; 1 = off, 3 about 1.5-2x faster", speed=True)
    tiny_vae: bool = _f(False, "fast: decode with a tiny VAE (TAESD for SD's VAE, downloaded once, or the model's "
                               "own tiny_vae/ folder): 10-15x faster decoding, softer fine detail", speed=True)
    autocast: bool = _f(False, "fast: the UNet and the VAE's decoder compute in bf16 (torch.autocast; the weights "
                               "stay fp32) on a CPU that computes bf16 natively (AVX-512 BF16 or AMX); elsewhere the "
                               "run goes on without it and says why", speed=True)
    fast: bool = _f(False, f"the fast settings for what is left off: {FAST_TEXT} (set --deep-cache and --cfg-cutoff "
                           "instead for Fast without autocast)", speed=True)
    # Image to image, inpainting (with an init image) and hires fix (without one): A1111's controls and names.
    strength: float | None = _f(None, "denoising strength: how much of the init image (or of the hires fix's first "
                                      "pass) is redrawn, 0-1 (default: A1111's 0.75 for an init image, 0.7 for "
                                      "hires fix)", type=float)
    resize_mode: str = _f("Just resize", "how the init image is fitted to width x height", choices=list(RESIZE_MODES))
    mask_blur: int = _f(4, f"inpainting: blur of the mask's edge in px, 0-{MAX_MASK_BLUR}")
    masked_content: str = _f("original", "inpainting: what the masked area starts from",
                             choices=list(MASKED_CONTENT))
    only_masked: bool = _f(False, "inpainting: redraw only the masked area (plus padding) at width x height, then "
                                  "paste it back into the whole image (A1111 'Inpaint area: Only masked')")
    only_masked_padding: int = _f(32, "inpainting, only masked: px of context kept around the mask")
    hires_scale: float = _f(1.0, "hires fix: upscale the first pass by this factor and redraw it (1 = off)",
                            flag="--hires", type=float)
    hires_width: int = _f(0, "hires fix: target width in px instead of a factor (0 = from --hires or the height)")
    hires_height: int = _f(0, "hires fix: target height in px instead of a factor (0 = from --hires or the width)")
    hires_steps: int = _f(0, "hires fix: steps of the second pass (0 = as many as the first)")
    hires_upscaler: str = _f("Latent", "hires fix: how the first pass is enlarged", choices=list(HIRES_UPSCALERS))

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
                    cfg_cutoff=_number("cfg_cutoff", self.cfg_cutoff), deep_cache=_whole("deep_cache", self.deep_cache),
                    tiny_vae=_flag("tiny_vae", self.tiny_vae), autocast=_flag("autocast", self.autocast),
                    fast=_flag("fast", self.fast))
        p = replace(p, strength=_number("strength", p.strength, optional=True),
                    mask_blur=_whole("mask_blur", p.mask_blur), only_masked=_flag("only_masked", p.only_masked),
                    only_masked_padding=_whole("only_masked_padding", p.only_masked_padding),
                    hires_scale=_number("hires_scale", p.hires_scale),
                    hires_steps=_whole("hires_steps", p.hires_steps),
                    hires_width=_whole("hires_width", p.hires_width),
                    hires_height=_whole("hires_height", p.hires_height))
        if p.steps is not None and not 1 <= p.steps <= MAX_STEPS:
            bad("steps", f"{p.steps} is out of range; use 1 to {MAX_STEPS}")
        if not 0 <= p.cfg_cutoff <= 1:
            bad("cfg_cutoff", f"{p.cfg_cutoff:g} is out of range; use 0 to 1 (1 = off)")
        if not 1 <= p.deep_cache <= MAX_DEEP_CACHE:
            bad("deep_cache", f"{p.deep_cache} is out of range; use 1 (off) to {MAX_DEEP_CACHE}")
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
        if p.strength is not None and not 0 <= p.strength <= 1:
            bad("strength", f"{p.strength:g} is out of range; use 0 to 1")
        if not 0 <= p.mask_blur <= MAX_MASK_BLUR:
            bad("mask_blur", f"{p.mask_blur} is out of range; use 0 to {MAX_MASK_BLUR}")
        if not 0 <= p.only_masked_padding <= MAX_SIDE:
            bad("only_masked_padding", f"{p.only_masked_padding} is out of range; use 0 to {MAX_SIDE}")
        if not 1 <= p.hires_scale <= MAX_HIRES_SCALE:
            bad("hires_scale", f"{p.hires_scale:g} is out of range; use 1 (off) to {MAX_HIRES_SCALE}")
        if not 0 <= p.hires_steps <= MAX_STEPS:
            bad("hires_steps", f"{p.hires_steps} is out of range; use 0 (as many as the first pass) to {MAX_STEPS}")
        for name in ("hires_width", "hires_height"):
            v = getattr(p, name)
            if v and (v < 0 or v > MAX_SIDE or v % 8):
                bad(name, f"{v} px is not allowed; use 0 or a multiple of 8 up to {MAX_SIDE}")
        for name, names in (("sampler", SAMPLERS), ("schedule", SCHEDULES), ("resize_mode", RESIZE_MODES),
                            ("masked_content", MASKED_CONTENT), ("hires_upscaler", HIRES_UPSCALERS)):
            value = getattr(p, name)
            if value is not None and not isinstance(value, str):
                bad(name, "must be text (a name from the list)")
            # checked here to quote it on one line, short (a pasted page was not)
            if (value or name in _STRICT) and value not in names:
                bad(name, f"unknown {_shown(value)}; choose one of {', '.join(names)}")
        resolve_schedule(p.sampler or DEFAULT_SAMPLER, p.schedule)  # a None schedule -> ValueError naming it
        return p


SPEED = tuple(f.name for f in fields(GenerationParams) if f.metadata.get("speed"))
_STRICT = ("resize_mode", "masked_content", "hires_upscaler")  # no "" = default for these


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


def _flag(name: str, value) -> bool:
    """A bool from a bool or its JSON / form text ("true", "false"); anything else is refused."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):  # 0 / 1 from JSON; str() of a 5000-digit int would raise
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"{name}: {_shown(value)} is not true or false")
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"{name}: {_shown(value)} is not true or false")


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
    previews: list[Image.Image] | None = None  # the batch's first image as it forms (what the page shows)


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


def check_inputs(model: LoadedModel, params: GenerationParams,
                 source: tuple[int, int] | None = None) -> GenerationParams:
    """Validated params with the model's defaults filled in; clip skip is checked against this model's depth.
    ``source``: the init image's size, which sets the output's aspect (img2img.output_size)."""
    p = params.validate()
    if p.clip_skip > model.max_clip_skip:
        raise ValueError(f"clip_skip: {p.clip_skip} is out of range for this model (its text encoder is shallower); "
                         f"use 1 to {model.max_clip_skip}")
    if p.fast:
        fast = {k: v for k, v in FAST.items() if k != "autocast" or model.autocast_pays}
        p = replace(p, **{k: v for k, v in fast.items() if getattr(p, k) == getattr(GenerationParams, k)})
    size = model.default_size
    width, height = img2img.output_size(source, size, p.width, p.height) if source else (p.width, p.height)
    return replace(
        p,
        width=width or size,
        height=height or size,
        seed=resolve_seed(p.seed),
        steps=p.steps or model.default_steps,
        guidance_scale=model.default_guidance if p.guidance_scale is None else p.guidance_scale,
        sampler=p.sampler or model.default_sampler,
        strength=(DEFAULT_STRENGTH if source else DEFAULT_HIRES_STRENGTH) if p.strength is None else p.strength,
    )


def make_generators(seed: int, n: int) -> list[torch.Generator]:
    # CPU generators: the same seed gives the same noise, hence the same image, on CPU, CUDA and MPS.
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def noise_draws(seed: int, shape: tuple[int, ...], n: int) -> list[torch.Tensor]:
    """The first ``n`` noise tensors (B, C, h, w) that the generators of ``make_generators(seed, B)`` give, in
    order: the first is the noise diffusers' img2img start draws from them."""
    gens = make_generators(seed, shape[0])
    return [torch.stack([torch.randn(shape[1:], generator=g) for g in gens]) for _ in range(n)]


# The pipeline's tensors that carry CFG's two halves (negative first), per family: halved when CFG ends early.
_CFG_TENSORS = {"sdxl": ["prompt_embeds", "add_text_embeds", "add_time_ids"]}


def _cfg_tensors(family: str) -> list[str]:
    return _CFG_TENSORS.get(family, ["prompt_embeds"])


@dataclass
class _Progress:
    """How a denoising pass reports: steps of earlier passes (hires fix) and of passes still to come."""

    on_step: Callable[[StepEvent], None] | None
    cancel: threading.Event | None
    preview_every: int
    state: dict
    t0: float = field(default_factory=time.perf_counter)

    def callback(self, model: LoadedModel, cfg_cutoff: float, before: int = 0, after: int = 0, blend=None):
        """diffusers' step-end callback: ``blend(pipe, i, latents)`` (inpainting) first, then CFG's end, the
        step event, and Stop."""
        def step_end(pipe, i, t, kwargs):
            run = pipe.num_timesteps  # the steps this pass runs (img2img: a share of the schedule)
            self.state["steps_done"] = before + i + 1
            if blend is not None:
                kwargs["latents"] = blend(pipe, i, kwargs["latents"])
            if cfg_cutoff < 1 and i + 1 == max(1, round(run * cfg_cutoff)) and pipe.do_classifier_free_guidance:
                # A1111's "negative guidance minimum sigma" by step count (diffusers' dynamic-CFG recipe): the
                # rest of the steps run the prompt's half alone, at one pass a step instead of two
                pipe._guidance_scale = 0.0
                for name in _cfg_tensors(model.family):
                    kwargs[name] = kwargs[name].chunk(2)[-1]
            if self.on_step is not None:
                previews = None
                if self.preview_every and ((i + 1) % self.preview_every == 0) and i + 1 < run:
                    # the step's denoised estimate where the sampler gave one (A1111 previews it too): the
                    # latents themselves are mostly noise until the last steps
                    shown = self.state.pop("denoised", None)
                    if shown is None or shown.shape != kwargs["latents"].shape:
                        shown = kwargs["latents"]
                    previews = _previews(model, shown[:1])
                self.on_step(StepEvent(before + i + 1, before + run + after, time.perf_counter() - self.t0,
                                       previews))
            if self.stopped(i + 1 + before):
                pipe._interrupt = True  # diffusers skips the remaining steps and returns the current latents
            return kwargs

        return step_end

    @contextlib.contextmanager
    def watching(self, scheduler):
        """Within the block, each step of ``scheduler`` leaves its denoised estimate (x̂0) for the next preview."""
        if self.on_step is None or not self.preview_every:
            yield
            return
        step = scheduler.step

        # wraps: the pipeline reads step's signature to pass it the generator (Euler a's noise) and eta
        @functools.wraps(step)
        def recorded(*args, return_dict: bool = True, **kwargs):
            out = step(*args, return_dict=True, **kwargs)
            self.state["denoised"] = _denoised(scheduler, out)
            return out if return_dict else out.to_tuple()

        before = scheduler.__dict__.get("step")  # (None: the class's own method)
        scheduler.step = recorded
        try:
            yield
        finally:
            if before is None:
                del scheduler.step
            else:
                scheduler.step = before

    def stopped(self, step: int | None = None) -> bool:
        """Has Stop arrived (recording the step it arrived at)?"""
        if self.state.get("interrupted_at") is None and self.cancel is not None and self.cancel.is_set():
            self.state["interrupted_at"] = step or 0
        return self.state.get("interrupted_at") is not None


def _previews(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    """Live previews, 4x the latents' size: decoded by the model's tiny VAE where it is loaded or the model has its
    own, or by its VAE where that is small (the embedded model's: 14 ms, and too far from linear for a map: 120/255
    off on its own pictures), else by a linear map fitted to its VAE (SD's decoder takes seconds on a CPU; a
    compiled one would compile again for the preview's batch of one)."""
    tiny = model.tiny_vae is not None or ((model.folder / TINY_VAE_DIR / "config.json").is_file()
                                          and not load_tiny_vae(model))
    small = sum(w.numel() for w in model.pipe.vae.decoder.parameters()) <= PREVIEW_DECODER_PARAMS
    if tiny or (small and not model.compiled):
        size = (latents.shape[-1] * 4, latents.shape[-2] * 4)
        return [im.resize(size, Image.Resampling.BILINEAR) for im in decode(model, latents, tiny=tiny)]
    if model.preview_map is None:
        model.preview_map = fit_preview_map(model.pipe.vae)
    return latents_to_preview(latents, model.preview_map)


def _denoised(scheduler, out) -> torch.Tensor | None:
    """A scheduler step's estimate of the clean latents: most name it in their output (LCM: ``denoised``); DPM-Solver
    ++ and UniPC keep it as their last model output; others (PLMS) give none."""
    for name in ("pred_original_sample", "denoised"):
        if out.get(name) is not None:
            return out[name]
    in_x0 = scheduler.config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++") or scheduler.config.get(
        "predict_x0")
    outputs = getattr(scheduler, "model_outputs", None)
    return outputs[-1] if in_x0 and outputs and outputs[-1] is not None else None


def variant(model: LoadedModel, kind: str):
    """The loaded pipeline as diffusers' ``img2img`` or ``inpaint`` pipeline: ``from_pipe`` shares its modules (no
    second copy of the weights; LoRAs and embeddings apply to both), made once per model."""
    import diffusers

    if kind not in model.variants:
        auto = {"img2img": diffusers.AutoPipelineForImage2Image, "inpaint": diffusers.AutoPipelineForInpainting}
        model.variants[kind] = auto[kind].from_pipe(model.pipe)
        model.variants[kind].set_progress_bar_config(disable=True)  # steps are reported through the callback
    pipe = model.variants[kind]
    pipe.scheduler = model.pipe.scheduler  # the sampler this run chose
    return pipe


def denoise(model: LoadedModel, p: GenerationParams, pos: WeightedPrompt, neg: WeightedPrompt, generators,
            callback, pipe=None, **extra) -> torch.Tensor:
    """Run a diffusers pipeline's loop (``model.pipe``, or an img2img / inpaint variant with its ``extra``
    arguments) and return latents (B, 4, H/8, W/8)."""
    pipe = pipe or model.pipe
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
        **extra,
    )
    if "width" not in inspect.signature(pipe.__call__).parameters:  # img2img: the start's size is the size
        del kwargs["width"], kwargs["height"]
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
    with feature_cache(pipe.unet, p.deep_cache):
        return pipe(**kwargs).images


@torch.no_grad()
def encode(model: LoadedModel, images: list[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> VAE latents (B, 4, h, w), the distribution's mean (no draw from any generator), in
    the scaled space the UNet works in (decode's inverse)."""
    vae = model.pipe.vae
    x = model.pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)  # (B, 3, H, W) in [-1, 1]
    latents = vae.encode(x).latent_dist.mean.float()
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        return (latents - torch.tensor(mean).view(shape)) * vae.config.scaling_factor / torch.tensor(std).view(shape)
    return latents * vae.config.scaling_factor


@torch.no_grad()
def decode(model: LoadedModel, latents: torch.Tensor, tiny: bool = False) -> list[Image.Image]:
    """VAE-decode (B, 4, h, w) latents to PIL images, retrying in fp32 when fp16 overflows to NaN. ``tiny``: with
    the model's tiny VAE (load_tiny_vae), which reads the UNet's scaled latents as they are."""
    if tiny:
        image = model.tiny_vae.decode(latents.to(model.tiny_vae.dtype), return_dict=False)[0]
        return model.pipe.image_processor.postprocess(image, output_type="pil")
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


def _txt2img(model: LoadedModel, p: GenerationParams, pos, neg, progress: _Progress) -> list[Image.Image]:
    """Text to image, and the hires fix's second pass when it is on (A1111's order: generate, enlarge, redraw)."""
    hires = p.hires_scale > 1 or bool(p.hires_width or p.hires_height)
    later = (p.hires_steps or p.steps) if hires and p.strength > 0 else 0
    nine = model.pipe.unet.config.in_channels == 9
    latents = denoise(model, p, pos, neg, make_generators(p.seed, p.batch_size),
                      progress.callback(model, p.cfg_cutoff, after=later),
                      **(_redraw_all(model, Image.new("RGB", (p.width, p.height), (127, 127, 127)), 1.0) if nine
                         else {}))
    if not hires or progress.stopped():
        return decode(model, latents, p.tiny_vae)
    width, height = img2img.hires_size(p.width, p.height, p.hires_scale, p.hires_width, p.hires_height)
    f = model.pipe.vae_scale_factor
    if nine:  # an inpainting checkpoint redraws pictures: the first pass enlarged in pixels
        resample = img2img.pixel_resample(p.hires_upscaler)
        start = [im.resize((width, height), resample) for im in decode(model, latents, p.tiny_vae)]
    elif img2img.is_latent_upscaler(p.hires_upscaler):
        start = img2img.upscale_latents(latents, (height // f, width // f), p.hires_upscaler)
    else:
        resample = img2img.pixel_resample(p.hires_upscaler)
        start = encode(model, [im.resize((width, height), resample) for im in decode(model, latents, p.tiny_vae)])
    if not later:
        return start if nine else decode(model, start, p.tiny_vae)
    # A1111 runs the hires steps in full: a schedule stretched so that 'strength' of it is that many steps
    steps = math.ceil(later / min(p.strength, 0.999))
    second = replace(p, width=width, height=height, steps=steps)
    before = progress.state.get("steps_done", p.steps)
    latents = denoise(model, second, pos, neg, make_generators(p.seed, p.batch_size),
                      progress.callback(model, p.cfg_cutoff, before=before),
                      **(_redraw_all(model, start, p.strength) if nine else
                         dict(pipe=variant(model, "img2img"), image=start, strength=p.strength)))
    return decode(model, latents, p.tiny_vae)


def _redraw_all(model: LoadedModel, image: Image.Image | list[Image.Image], strength: float) -> dict:
    """``denoise``'s arguments for an inpainting checkpoint (9-channel UNet) redrawing all of ``image`` (one, or
    one per image of the batch): its pipeline with a white mask, so the masked picture it is conditioned on is
    blank, as A1111 conditions such a checkpoint in txt2img and the hires fix."""
    size = (image[0] if isinstance(image, list) else image).size
    return dict(pipe=variant(model, "inpaint"), image=image, mask_image=Image.new("L", size, 255),
                strength=strength)


def _keep_unmasked(source: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor):
    """A step-end hook that puts the source's latents back where the mask keeps them, noised to the level of the
    next step (the start's noise, so the kept area follows the path the sampler started on)."""
    def blend(pipe, i, latents):
        run = pipe.scheduler.timesteps[-pipe.num_timesteps:]  # the steps this pass runs
        ref = (source if i + 1 >= len(run) else
               pipe.scheduler.add_noise(source, noise, run[i + 1:i + 2].repeat(len(source))))
        return keep * ref.to(latents) + (1 - keep) * latents
    return blend


def _img2img(model: LoadedModel, p: GenerationParams, pos, neg, init: Image.Image, mask: Image.Image | None,
             progress: _Progress) -> list[Image.Image]:
    """Image to image and inpainting: prepare (img2img.prepare), encode, denoise from ``strength``, decode, paste
    back. An ordinary checkpoint inpaints by putting the unmasked latents back at each step's noise level (what
    diffusers' inpaint pipeline does for 4-channel UNets); an inpainting checkpoint (9-channel UNet) runs diffusers'
    inpaint pipeline."""
    nine = model.pipe.unet.config.in_channels == 9
    if nine and mask is None:
        raise ValueError("mask: this is an inpainting checkpoint; give a mask (or load an ordinary checkpoint for "
                         "image to image)")
    if nine and p.masked_content.startswith("latent"):
        raise ValueError(f"masked_content: '{p.masked_content}' needs an ordinary checkpoint; on this inpainting "
                         "checkpoint use original or fill")
    prepared = img2img.prepare(model.pipe.image_processor, init, mask, p.width, p.height, p.resize_mode, p.mask_blur,
                               p.masked_content, p.only_masked, p.only_masked_padding)
    generators = make_generators(p.seed, p.batch_size)
    callback = functools.partial(progress.callback, model, p.cfg_cutoff)
    if int(p.steps * p.strength) < 1:  # no step to run (strength 0): the source after the VAE's round trip
        start = encode(model, [prepared.image]).repeat(p.batch_size, 1, 1, 1)
        return img2img.paste_back(prepared, decode(model, start, p.tiny_vae))
    if nine:  # the inpaint pipeline encodes the picture and its masked copy itself
        latents = denoise(model, p, pos, neg, generators, callback(), pipe=variant(model, "inpaint"),
                          image=prepared.image, mask_image=prepared.mask, strength=p.strength)
        return img2img.paste_back(prepared, decode(model, latents, p.tiny_vae))
    start = encode(model, [prepared.image]).repeat(p.batch_size, 1, 1, 1)  # (B, 4, h, w)
    blend = None
    if prepared.mask is not None:
        keep = img2img.latent_keep(prepared.mask, start.shape[-2:]).to(start)  # (1, 1, h, w)
        noise, fill_noise = noise_draws(p.seed, tuple(start.shape), 2)
        blend = _keep_unmasked(start, keep, noise.to(start))
        start = img2img.start_latents(start, keep, p.masked_content, fill_noise)
    latents = denoise(model, p, pos, neg, generators, callback(blend=blend), pipe=variant(model, "img2img"),
                      image=start, strength=p.strength)
    return img2img.paste_back(prepared, decode(model, latents, p.tiny_vae))


def make_infotext(model: LoadedModel, p: GenerationParams, seed: int, source: tuple[int, int] | None = None,
                  masked: bool = False) -> Infotext:
    params = {
        "Steps": p.steps,
        "Sampler": p.sampler,
        "Schedule type": resolve_schedule(p.sampler, p.schedule),
        "CFG scale": p.guidance_scale,
        "Seed": seed,
        "Size": f"{p.width}x{p.height}",
        "Model": model.ref.public_name,
    }
    if source:
        params["Denoising strength"] = p.strength
        params["Init image size"] = f"{source[0]}x{source[1]}"
        if p.resize_mode != "Just resize":
            params["Resize mode"] = p.resize_mode
    if masked:
        params.update({"Mask blur": p.mask_blur, "Masked content": p.masked_content})
        if p.only_masked:
            params.update({"Inpaint area": "Only masked", "Masked area padding": p.only_masked_padding})
    if not source and (p.hires_scale > 1 or p.hires_width or p.hires_height):
        params["Denoising strength"] = p.strength
        if p.hires_width or p.hires_height:
            params["Hires resize"] = "x".join(map(str, img2img.hires_size(p.width, p.height, p.hires_scale,
                                                                          p.hires_width, p.hires_height)))
        else:
            params["Hires upscale"] = p.hires_scale
        if p.hires_steps:
            params["Hires steps"] = p.hires_steps
        params["Hires upscaler"] = p.hires_upscaler
    if p.clip_skip > 1:
        params["Clip skip"] = p.clip_skip
    if p.cfg_cutoff < 1:
        params["CFG cutoff"] = p.cfg_cutoff
    if p.deep_cache > 1:
        params["Deep cache"] = p.deep_cache
    if p.tiny_vae:
        params["Tiny VAE"] = model.tiny_vae_name
    if p.autocast:
        params["Autocast"] = "bf16"
    params["Version"] = f"sd_demo {__version__}"
    return Infotext(p.prompt, p.negative_prompt, params)


def generate(
    model: LoadedModel,
    params: GenerationParams,
    *,
    init_image: Image.Image | None = None,
    mask: Image.Image | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    cancel: threading.Event | None = None,
    preview_every: int = 5,
) -> GenerationResult:
    """Generate ``params.batch_size`` images; image i uses seed+i. With ``init_image``: image to image, and with
    ``mask`` (white = redraw) inpainting. Stop via ``cancel`` returns what was reached."""
    if mask is not None and init_image is None:
        raise ValueError("mask: give the image it belongs to as well (init_image)")
    init = img2img.check_source(init_image) if init_image is not None else None
    mask = img2img.check_mask(mask, init.size) if mask is not None else None
    p = check_inputs(model, params, init.size if init else None)
    t0 = time.perf_counter()
    progress = _Progress(on_step, cancel, preview_every, {})
    notes = []
    if p.autocast and model.autocast_reason:  # a picture's parameters from another machine, say: run, and say why
        p = replace(p, autocast=False)
        notes.append(f"autocast: {model.autocast_reason}; ran without it")
    # one job at a time per pipeline: the scheduler below is pipeline state, and so are autocast's hooks
    with model.lock, compiled_run(model), autocast_run(model, p.autocast):
        if p.tiny_vae and (missing := load_tiny_vae(model)):  # the run goes on with the full VAE and says so
            p = replace(p, tiny_vae=False)
            notes.append(f"tiny VAE: {missing}; decoded with the full VAE")
        key = (p.sampler, p.schedule)
        if key not in model.schedulers:  # built once per pair; set_timesteps resets its state each run
            model.schedulers[key] = make_scheduler(p.sampler, p.schedule, model.base_scheduler_config)
        model.pipe.scheduler = model.schedulers[key]
        pos, neg = parse_attention(p.prompt), parse_attention(p.negative_prompt)
        with progress.watching(model.pipe.scheduler):
            images = (_img2img(model, p, pos, neg, init, mask, progress) if init is not None
                      else _txt2img(model, p, pos, neg, progress))
    seeds = [p.seed + i for i in range(p.batch_size)]
    source = init.size if init else None
    return GenerationResult(
        images=images,
        infotexts=[make_infotext(model, p, s, source, mask is not None) for s in seeds],
        seeds=seeds,
        interrupted_at=progress.state.get("interrupted_at"),
        warnings=[f"prompt: {w}" for w in pos.warnings] + [f"negative prompt: {w}" for w in neg.warnings] + notes,
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
    "Deep cache": ("deep_cache", int),
    "Denoising strength": ("strength", float),
    "Resize mode": ("resize_mode", str),
    "Mask blur": ("mask_blur", int),
    "Masked content": ("masked_content", str),
    "Masked area padding": ("only_masked_padding", int),
    "Hires upscale": ("hires_scale", float),
    "Hires steps": ("hires_steps", int),
    "Hires upscaler": ("hires_upscaler", str),
}


def _size(text: str) -> tuple[int, int] | None:
    w, sep, h = str(text).partition("x")
    return (int(w), int(h)) if sep and w.isdigit() and h.isdigit() else None


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
        elif key == "Hires resize" and _size(value):
            values["hires_width"], values["hires_height"] = _size(value)
        elif key == "Tiny VAE":
            values["tiny_vae"] = True
        elif key == "Autocast":
            values["autocast"] = True
        elif key == "Inpaint area":
            values["only_masked"] = value == "Only masked"
        # the model and LoRAs: engine.locate_*; the source picture's size: the PNG does not hold the source
        elif key not in ("Model", "Model hash", "Version", "Lora", "Init image size"):
            ignored.append(key)
    sampler = values.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        # A1111 before 1.6 wrote the schedule into the sampler name: "DPM++ 2M Karras".
        base, _, sched = sampler.rpartition(" ")
        if base in SAMPLERS and sched in SCHEDULES and "schedule" not in values:
            values["sampler"], values["schedule"] = base, sched
        else:
            ignored.append(f"Sampler ({values.pop('sampler')})")
    for key, name, names in (("Schedule type", "schedule", SCHEDULES), ("Hires upscaler", "hires_upscaler",
                                                                          HIRES_UPSCALERS),
                             ("Resize mode", "resize_mode", RESIZE_MODES), ("Masked content", "masked_content",
                                                                           MASKED_CONTENT)):
        if name in values and values[name] not in names:  # A1111's ESRGAN upscalers, say
            ignored.append(f"{key} ({values.pop(name)})")
    return GenerationParams(**values), ignored
