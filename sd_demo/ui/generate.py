"""The Generate tab. Only widgets and wiring: every decision is made by sd_demo.engine / sd_demo.generate."""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass

import gradio as gr

from .. import zerogpu
from ..engine import Engine, ModelDefaults
from ..generate import (DEFAULT_HIRES_STRENGTH, FAST_TEXT, MAX_BATCH, MAX_CLIP_SKIP, MAX_DEEP_CACHE, MAX_HIRES_SCALE,
                        MAX_SIDE, MAX_STEPS, SPEED, GenerationParams)
from ..hub import first_line
from ..img2img import HIRES_UPSCALERS
from ..xyz import AXES as XYZ_AXES
from ..infotext import format_infotext
from ..models import DEFAULT_GUIDANCE, parse_lora, parse_loras
from ..runqueue import RUNNING
from ..sampling.registry import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES

log = logging.getLogger(__name__)


@dataclass
class GenerateTab:
    """Components other tabs write to (PNG Info's "Send to Generate")."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    schedule: gr.Dropdown
    steps: gr.Slider
    guidance_scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    batch_size: gr.Slider
    clip_skip: gr.Slider
    loras: gr.Textbox  # "source[:scale], ...": run names, files, folders, Hub ids (Engine.lora_sources)
    model: gr.Dropdown  # the Training tab's "Use in Generate" puts a full fine-tune here
    cfg_cutoff: gr.Slider  # an input after model and loras (the API's positions before it stay as they were)
    deep_cache: gr.Slider  # with fast: inputs after the X/Y/Z plot's (the API's positions before stay)
    fast: gr.Checkbox
    tiny_vae: gr.Checkbox  # an input after fast
    autocast: gr.Checkbox  # an input after tiny_vae
    hires: list  # [on, scale, steps, strength, upscaler, width, height]: the Hires. fix accordion, API order
    send_img2img: gr.Button  # "Send to img2img" under the gallery (wired by ui.img2img)
    gallery: gr.Gallery
    infos: gr.State  # the gallery's images' parameters (A1111 text), in order
    picked: gr.State  # the index of the gallery's selected image
    loaded: gr.State  # changes when a model has loaded (the img2img tab then takes its defaults), not on a failure

    def param_components(self) -> list:
        return [self.prompt, self.negative_prompt, self.sampler, self.schedule, self.steps, self.guidance_scale,
                self.width, self.height, self.seed, self.batch_size, self.clip_skip]

    def speed_components(self) -> list:
        """The speed switches, in the order of ``speed_values`` (generate.SPEED)."""
        return [getattr(self, name) for name in SPEED]


def speed_values(params: GenerationParams) -> list:
    """The speed switches' values for a picture's parameters: as recorded (its infotext has what Fast resolved to),
    Fast itself off so that nothing more is added."""
    return [getattr(params, name) if name != "fast" else False for name in SPEED]


# Generation handlers wait in the engine's queue (sd_demo.runqueue), which runs one job at a time and tells each its
# place; gradio lets them all in (its own queue would show one place for everyone). preprocess=False so that our
# validation (which names the field) sees the raw values instead of gradio's range checks ("Value 0 is less than
# minimum value 1.").
# On ZeroGPU each request runs in a worker process of its own (and its own queue): there gradio's limit of one keeps
# the requests in turn.
RUN = dict(concurrency_id="generation", concurrency_limit=1 if zerogpu.active() else None, preprocess=False)
# Galleries of results: whole pictures (gradio's default crops them to its tiles), nothing to drop in
SHOWN = dict(object_fit="contain", interactive=False)


def results_gallery(elem_id: str) -> gr.Gallery:
    """A generating tab's gallery of images (fit-content: gradio's default and "auto" heights cap a gallery at
    55 vh, cutting a single picture)."""
    return gr.Gallery(**SHOWN, label="Images", columns=2, height="fit-content", format="png", elem_id=elem_id)


def run_events(gallery: gr.Gallery) -> dict:
    """A generating tab's run events: RUN, with gradio's progress over the gallery, not over the live preview."""
    return dict(RUN, show_progress_on=gallery)
QUEUE_REFRESH_S = 1.0  # how often an open page's queue panel asks for changes

# The page gets a step at most this often (and with each preview): each update costs gradio a message and a diff,
# and a small model's 20 steps at 25 per second made them a third of the request (issue 19).
UPDATE_S = 0.25


def sampler_choices() -> list[tuple[str, str]]:
    """(label, value) pairs: the value is A1111's name; our own schedulers carry a star in the label."""
    return [(f"{name} ★" if spec.ours else name, name) for name, spec in SAMPLERS.items()]


def error_line(exc: Exception, what: str = "generation") -> str:
    """A ValueError is the user's to fix: its line. Anything else is ours: log the traceback, say it in one line."""
    if isinstance(exc, ValueError):
        return str(exc)
    log.exception("%s failed", what, exc_info=exc)
    return f"{what} failed: {type(exc).__name__}: {first_line(exc)}"


class UserError(gr.Error):
    """A line for the page, not a traceback in the server's console (gradio prints one for each gr.Error; our own
    failures are logged where they are caught: error_line)."""

    def __init__(self, message: str):
        super().__init__(message, print_exception=False)


def user_error(exc: Exception) -> gr.Error:
    """An exception as the page shows it (error_line)."""
    return UserError(error_line(exc))


def said_on(line: str, others: int) -> tuple:
    """A failed action's outputs: the line on its note, the other outputs left as they are (a raised gr.Error marks
    every output "Error", hiding their values, and the mark stays)."""
    return f"⚠️ {line}", *[gr.skip()] * others


def checked(engine: Engine, public: bool, visitor: str | None, model: str | None, loras: str, **values):
    """(model spec, LoRA list, validated GenerationParams) of a request's raw values, or gr.Error naming the field
    to change."""
    try:
        model = engine.chosen_model(model, public)
        lora_list = engine.lora_sources(parse_loras(loras), public, visitor)
        # raw values: validate() converts them and names the field of one it cannot use (width='abc')
        values.update(width=values.get("width") or None, height=values.get("height") or None,
                      seed=-1 if values.get("seed") is None else values["seed"])
        return model or None, lora_list, GenerationParams(**values).validate()
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def session_of(request) -> str:
    """A request's browser session (its Stop key); "api" for a call without one."""
    return getattr(request, "session_hash", None) or "api"


def owner_of(visitor: str | None, request) -> str:
    """Whose queue and history a request's jobs join: the visitor (kept across reloads), else the API session
    (marked so that it never equals a Hugging Face name)."""
    return visitor or f"session:{session_of(request)}"


def stream(engine: Engine, params: GenerationParams, model: str | None, loras: list, request, progress,
           init_image=None, mask=None, axes: list[tuple[str, str]] | None = None, public: bool = False,
           visitor: str | None = None):
    """A run's page updates (gallery, preview, status, parameters, all parameters): a first one at once, its place
    in the queue while it waits, the steps at most every UPDATE_S, then the result. ``axes``: an X/Y/Z plot of
    ``params`` instead."""
    job = session_of(request)
    progress(0, desc="starting")
    note = engine.training_note()
    # Yield before any work: gradio keeps a run's iterator (and so can close it when its client goes away) only
    # from its first yield on; a client that left before then left a run nobody could stop holding the slot.
    yield gr.skip(), gr.skip(), "starting" + (f" · {note}" if note else ""), gr.skip(), gr.skip()
    shown = 0.0  # when the page last got a step
    try:
        for update in engine.run(params, model=model, job=job, loras=loras, init_image=init_image, mask=mask,
                                 axes=axes, owner=owner_of(visitor, request), public=public):
            if update.waiting:
                yield gr.skip(), gr.skip(), update.waiting, gr.skip(), gr.skip()
            elif update.step is None and update.result is None:  # a heartbeat: the run goes on
                continue
            elif update.step:
                ev = update.step
                if time.monotonic() - shown < UPDATE_S:
                    continue
                shown = time.monotonic()
                progress((ev.step, ev.total), desc="denoising", unit="steps")
                rate = ev.step / ev.elapsed if ev.elapsed else 0
                status = f"step {ev.step}/{ev.total} · {rate:.2f} it/s" + (f" · {note}" if note else "")
                yield gr.skip(), (ev.previews[0] if ev.previews else gr.skip()), status, gr.skip(), gr.skip()
            else:
                yield _finished(engine, update.result, update.paths, note)
    except Exception as exc:
        raise user_error(exc) from None


def make_generate_fn(engine: Engine, public: bool):
    # Named for the MCP tool list (gradio names a tool after its function): `generate` is ui.mcp's, which answers
    # with the PNG itself; this one answers with a gallery, which reaches an MCP client as text.
    def generate_gallery(
        prompt: str,
        negative_prompt: str = "",
        sampler: str | None = None,  # None (API callers): the model's recommended sampler
        schedule: str = GenerationParams.schedule,
        steps: int | None = None,  # None (API callers): the model's recommended steps
        guidance_scale: float | None = None,  # None (API callers): the model's recommended CFG scale
        width: int | None = None,
        height: int | None = None,
        seed: int = -1,
        batch_size: int = 1,
        clip_skip: int = 1,
        model: str | None = None,
        loras: str = "",
        cfg_cutoff: float = GenerationParams.cfg_cutoff,
        hires: bool = False,
        hires_scale: float = 2.0,
        hires_steps: int = GenerationParams.hires_steps,
        strength: float | None = None,
        hires_upscaler: str = GenerationParams.hires_upscaler,
        hires_width: int = GenerationParams.hires_width,
        hires_height: int = GenerationParams.hires_height,
        x_type: str = "Nothing",
        x_values: str = "",
        y_type: str = "Nothing",
        y_values: str = "",
        z_type: str = "Nothing",
        z_values: str = "",
        deep_cache: int = GenerationParams.deep_cache,
        fast: bool = GenerationParams.fast,
        tiny_vae: bool = GenerationParams.tiny_vae,
        autocast: bool = GenerationParams.autocast,
        visitor: str | None = None,  # a gr.State (not an API argument): whose training results are usable
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Text to image, as the Generate tab runs it: yields live previews; the final answer holds the PNGs (each
        with its A1111 parameters) in a gallery, a preview, a status line and the parameters as text.

        Args:
            prompt: What the images show.
            negative_prompt: What they should not show.
            sampler: An A1111 sampler name ("Euler a", "DPM++ 2M", ...); empty for the model's recommended one.
            schedule: The noise schedule ("Automatic", "Karras", "Exponential", ...).
            steps: Denoising steps, 1 to 150; empty for the model's recommended count.
            guidance_scale: Classifier-free guidance scale; empty for the model's recommended one.
            width: Width in pixels (multiple of 8, 64 to 2048); empty for the model's own size.
            height: Height in pixels (multiple of 8, 64 to 2048); empty for the model's own size.
            seed: Random seed; -1 for a random one. Image i of a batch uses seed + i.
            batch_size: Images to make, 1 to 8.
            clip_skip: Text-encoder layers to skip from the end (A1111's CLIP skip); 1 for none.
            model: A model from the app's list; empty for the loaded one.
            loras: LoRAs to apply, "source[:scale], ..." (a training run's name, a file or folder, a Hub repo id);
                empty for none.
            cfg_cutoff: Fast: after this fraction of the steps the negative prompt's pass is dropped (CFG ends);
                1 for never, 0.6 saves about a fifth of the time.
            hires: Hires fix: generate, enlarge, then redraw at the larger size (A1111's "Hires. fix").
            hires_scale: Hires fix: enlargement factor, 1 to 4.
            hires_steps: Hires fix: steps of the second pass; 0 for as many as the first.
            strength: Hires fix: denoising strength of the second pass, 0 to 1; empty for 0.7.
            hires_upscaler: Hires fix: "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest)",
                "Lanczos" or "Nearest".
            hires_width: Hires fix: target width instead of the factor; 0 for none.
            hires_height: Hires fix: target height instead of the factor; 0 for none.
            x_type: X/Y/Z plot (A1111's script): the X axis's parameter, or Nothing. An axis other than Nothing
                makes this run a plot: one image per combination of the axes' values, the other parameters as
                given; the gallery holds the labelled grid first, then every cell. Axes: Seed, Steps, CFG scale,
                Sampler, Schedule type, Prompt S/R, Denoising strength, Hires upscale, CFG cutoff, Deep cache, LoRA scale,
                Checkpoint.
            x_values: The X axis's values: "3, 5, 7", a range "10-30 (+10)" or "1-2 [5]"; for Prompt S/R the text
                in the prompt first, then what replaces it.
            y_type: The Y axis's parameter (rows), or Nothing.
            y_values: Its values.
            z_type: The Z axis's parameter (one grid per value), or Nothing.
            z_values: Its values.
            deep_cache: Fast: run the UNet's deep blocks on every N-th step only and reuse their features between
                (DeepCache); 1 for off, 3 is about 1.5-2x faster.
            fast: The Fast choice: the fast switches left off take Deep cache 3, CFG cutoff 0.6 and, where it
                pays (a CPU that computes bf16 natively, a large UNet), autocast: 2-4x faster, a little less detail.
            tiny_vae: Fast: decode with a tiny VAE (TAESD for SD's VAE, or the model's own), 10-15x faster
                decoding with softer fine detail.
            autocast: Fast: the UNet and the VAE's decoder compute in bf16 (torch.autocast) on a CPU with AVX-512
                BF16 or AMX; elsewhere the run goes on without it and says why.
        """
        values = {k: v for k, v in locals().items() if k in REQUEST_FIELDS}
        model, lora_list, params, axes = generation_request(engine, public, **values)
        yield from stream(engine, params, model, lora_list, request, progress, public=public, axes=axes,
                          visitor=visitor)

    return on_gpu(engine, public, generate_gallery)


def generation_request(engine: Engine, public: bool, *, prompt, negative_prompt, sampler, schedule, steps,
                       guidance_scale, width, height, seed, batch_size, clip_skip, model, loras, cfg_cutoff, hires,
                       hires_scale, hires_steps, strength, hires_upscaler, hires_width, hires_height, x_type,
                       x_values, y_type, y_values, z_type, z_values, deep_cache, fast, tiny_vae, autocast,
                       visitor):
    """(model spec, LoRA list, validated params, X/Y/Z axes or None) of the Generate tab's raw values, or gr.Error
    naming the field to change."""
    on = dict(hires_scale=hires_scale, hires_steps=hires_steps, strength=strength, hires_upscaler=hires_upscaler,
              hires_width=hires_width, hires_height=hires_height) if hires else {}
    model, lora_list, params = checked(
        engine, public, visitor, model, loras, prompt=prompt or "", negative_prompt=negative_prompt or "",
        steps=steps, guidance_scale=guidance_scale, width=width, height=height, seed=seed, sampler=sampler,
        schedule=schedule, batch_size=batch_size, clip_skip=clip_skip, cfg_cutoff=cfg_cutoff, deep_cache=deep_cache,
        fast=fast, tiny_vae=tiny_vae, autocast=autocast, **on)
    axes = [(kind or "Nothing", values) for kind, values in
            ((x_type, x_values), (y_type, y_values), (z_type, z_values))]
    return model, lora_list, params, None if all(kind == "Nothing" for kind, _ in axes) else axes


REQUEST_FIELDS = [n for n, p in inspect.signature(generation_request).parameters.items() if p.kind == p.KEYWORD_ONLY]


def make_enqueue_fn(engine: Engine, public: bool, names: list[str]):
    """The Queue button: the Generate tab's values (in ``names`` order) added to this visitor's queue, at once."""
    def enqueue(*values, request: gr.Request = None):
        if zerogpu.active():  # (the button is hidden there; a crafted request gets this line)
            raise UserError("queue: not on ZeroGPU; press Generate")
        args = dict(zip(names, values))
        model, lora_list, params, axes = generation_request(engine, public, **args)
        try:
            job = engine.enqueue(params, model, session_of(request), lora_list, axes=axes,
                                 owner=owner_of(args["visitor"], request), public=public)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return f"{engine.queue_note(job) or 'queued: starting now'} · its images appear in the History tab"

    return enqueue


def queue_rows(engine: Engine, owner: str, public: bool) -> tuple[list[list], list[str]]:
    """The queue panel's rows (place, state, kind, prompt) of the jobs this visitor sees, and their ids."""
    jobs = engine.queued(owner, public)
    rows = [["now" if job.state == RUNNING else f"{n} ahead", job.state, job.kind,
             job.label[:80] or "(no prompt)"] for job, n in jobs]
    return rows, [job.id for job, _ in jobs]


def wire_queue(engine: Engine, public: bool, visitor: gr.State, table: gr.Dataframe, shown: gr.State,
               picked_job: gr.State, buttons: tuple[gr.Button, gr.Button, gr.Button], timer: gr.Timer) -> None:
    """The queue panel: refreshed by ``timer`` when it changed (``shown``: the rows and ids on the page), a row
    picked, then Earlier / Later / Cancel on it."""
    def rows_now(who: str | None, request: gr.Request) -> dict:
        rows, job_ids = queue_rows(engine, owner_of(who, request), public)
        return {"rows": rows, "ids": job_ids}

    def refresh_queue(who: str | None, last: dict | None, request: gr.Request):
        now = rows_now(who, request)
        return (gr.skip(), gr.skip()) if now == last else (now["rows"], now)

    def pick(last: dict | None, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        job_ids = (last or {}).get("ids", [])
        return job_ids[row] if 0 <= row < len(job_ids) else ""

    def act(action):
        def handler(job_id: str, who: str | None, request: gr.Request):
            if not job_id:
                raise UserError("queue: pick a job in the table first")
            try:
                action(job_id, owner_of(who, request))
            except ValueError as exc:
                raise UserError(str(exc)) from None
            now = rows_now(who, request)
            return now["rows"], now, job_id if job_id in now["ids"] else ""
        return handler

    quick = dict(api_visibility="private", queue=False)
    timer.tick(refresh_queue, [visitor, shown], [table, shown], **quick)
    table.select(pick, shown, picked_job, **quick)
    earlier, later, cancel = buttons
    for button, action in ((earlier, lambda j, who: engine.move_queued(j, -1, who, public)),
                           (later, lambda j, who: engine.move_queued(j, 1, who, public)),
                           (cancel, lambda j, who: engine.cancel_queued(j, who, public))):
        button.click(act(action), [picked_job, visitor], [table, shown, picked_job], **quick)


def on_gpu(engine: Engine, public: bool, handler):
    """``handler`` under ``spaces.GPU`` when the ``spaces`` package is here (it returns ``handler`` itself off
    ZeroGPU), else ``handler``. The duration is read from the handler's own arguments ``model``, ``steps`` (0: the
    default), ``width``, ``height`` and ``batch_size`` (absent: 1) by sd_demo.zerogpu's rule; a request it cannot
    read gets the floor, and the handler refuses it at once anyway."""
    try:
        import spaces
    except ImportError:
        return handler
    signature = inspect.signature(handler)

    def gpu_seconds(*args, **kwargs) -> int:
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            v = bound.arguments
            model = engine.chosen_model(v["model"] or None, public)
            family, steps = engine.family(model), int(v["steps"] or engine.default_steps(model))
            w, h, n = int(v["width"] or 0), int(v["height"] or 0), int(v.get("batch_size", 1))
            seconds = zerogpu.generation_seconds(family, steps, w, h, n)
            if v.get("hires"):  # the second pass, at the enlarged size (a native-size guess when the size is unset)
                scale = float(v["hires_scale"])
                seconds += zerogpu.generation_seconds(family, int(v["hires_steps"] or steps), int(w * scale),
                                                      int(h * scale), n)
            return seconds
        except (TypeError, ValueError, OverflowError):
            return zerogpu.MIN_S

    return spaces.GPU(handler, duration=gpu_seconds)


def add_lora(current: str, source: str | None, scale: float = 1.0):
    """``current`` LoRA list with ``source`` at ``scale`` (replacing an entry of the same source); several stack."""
    if not source:
        return current, None
    items = [x.strip() for x in (current or "").split(",") if x.strip() and parse_lora(x.strip())[0] != source]
    return ", ".join([*items, f"{source}:{scale:g}"]), None


def _finished(engine: Engine, result, paths, note: str) -> tuple:
    infos = [format_infotext(i) for i in result.infotexts]
    stop = f" · stopped at step {result.interrupted_at}" if result.interrupted_at else ""
    status = f"{len(paths)} image(s) in {result.seconds:.1f} s · seed {result.seeds[0]}{stop} · {engine.model_status()}"
    if note:
        status += f"\n\n{note}"
    if result.warnings:
        status += "\n\n⚠️ " + "; ".join(result.warnings)
    return [str(p) for p in paths], None, status, infos[0], infos


def _load_model_fn(engine: Engine, public: bool):
    def load(model: str, clip_skip: int = 1, progress=gr.Progress(track_tqdm=True)):
        try:
            progress(0, desc=f"loading {model}")
            d = engine.defaults(engine.chosen_model(model, public))
        except Exception as exc:
            # the box back to the loaded model (else the start-up one): Generate would otherwise try the one that
            # failed
            back = engine.current_choice(public)
            return *said_on(f"{error_line(exc, 'loading')} · back to {back}", 7), back, gr.skip()
        # the new model's native size and the CFG scale and sampler its card recommends (else A1111's 7, DPM++ 2M);
        # the clip-skip slider ends at its text encoder's depth
        clip = gr.update(maximum=d.max_clip_skip, value=min(int(clip_skip or 1), d.max_clip_skip))
        # (an update as gr.Dataset(samples=...) would lose them: gradio keeps its samples processed without
        # components)
        examples = gr.update(samples=[[e] for e in d.examples], visible=bool(d.examples))
        return d.status, d.size, d.size, d.guidance, d.sampler, d.steps, clip, examples, gr.skip(), d.status

    return load


def gallery_item(images: list | None, texts: list[str] | None, index: int) -> tuple[str, str]:
    """(file, parameters) of a gallery's image ``index`` (its first when the index is stale), or gr.Error."""
    if not images or not texts:
        raise UserError("generate an image first")
    index = index if 0 <= (index or 0) < min(len(images), len(texts)) else 0
    return _path(images[index]), texts[index]


def _path(item) -> str | None:
    """A gallery item's file (gradio gives (image, caption) pairs, or their dicts)."""
    image = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(image, dict):
        image = image.get("image", image)
        image = image.get("path") if isinstance(image, dict) else image
    return str(image) if image else None


@dataclass
class SamplingControls:
    """The controls that the Generate and img2img tabs share, laid out the same in both."""

    sampler: gr.Dropdown
    schedule: gr.Dropdown
    steps: gr.Slider
    width: gr.Slider
    height: gr.Slider
    batch: gr.Slider
    cfg: gr.Slider
    seed: gr.Number
    random_btn: gr.Button
    reuse_btn: gr.Button
    fast: gr.Checkbox


def sampling_controls(d: ModelDefaults, size_info: str | None = None) -> SamplingControls:
    """Sampler, schedule, steps, size, batch, CFG and seed at the model's defaults (call inside a layout)."""
    with gr.Row():
        sampler = gr.Dropdown(sampler_choices(), value=d.sampler, label="Sampling method",
                              info="★ = written in this project")
        schedule = gr.Dropdown(list(SCHEDULES), value=GenerationParams.schedule, label="Schedule type")
    steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="Sampling steps")
    with gr.Row():
        width = gr.Slider(0 if size_info else 64, MAX_SIDE, value=0 if size_info else d.size, step=8, label="Width",
                          info=size_info)
        height = gr.Slider(0 if size_info else 64, MAX_SIDE, value=0 if size_info else d.size, step=8,
                           label="Height")
    with gr.Row():
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size")
        cfg = gr.Slider(0, 30, value=d.guidance, step=0.5, label="CFG scale")
    with gr.Row():
        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, scale=4)
        random_btn = gr.Button("🎲", scale=1, min_width=40)
        reuse_btn = gr.Button("♻️", scale=1, min_width=40)
    fast = gr.Checkbox(GenerationParams.fast, label="Fast", elem_classes="fast",
                       info=f"{FAST_TEXT} (where Advanced leaves them off): 2-4x faster, a little less detail")
    return SamplingControls(sampler, schedule, steps, width, height, batch, cfg, seed, random_btn, reuse_btn, fast)


def wire_run_controls(engine: Engine, c: SamplingControls, stop_btn: gr.Button, gallery: gr.Gallery,
                      infos: gr.State, infotext: gr.Textbox, picked: gr.State | None = None) -> None:
    """What a generating tab's buttons do: Stop (this browser's run), 🎲 (a random seed), ♻️ (the last result's
    seed), and a gallery pick showing its parameters (and its index in ``picked``)."""
    def stop(request: gr.Request):
        engine.cancel(request.session_hash)

    def last_seed(texts: list[str]):
        from ..infotext import parse_infotext

        return parse_infotext(texts[0]).params.get("Seed", -1) if texts else -1

    def show_info(texts: list[str], evt: gr.SelectData):
        return (texts[evt.index], evt.index) if texts and evt.index < len(texts) else ("", 0)

    quick = dict(queue=False, api_visibility="private")
    stop_btn.click(stop, None, None, **quick)
    c.random_btn.click(lambda: -1, None, c.seed, **quick)
    c.reuse_btn.click(last_seed, infos, c.seed, **quick)
    gallery.select(show_info, infos, [infotext, picked if picked is not None else gr.State(0)], **quick)


def build(engine: Engine, public: bool = False, notice: str = "", allow_loras: bool | None = None,
          visitor: gr.State | None = None) -> GenerateTab:
    """Lay out the tab and wire its events; call inside a gr.Blocks context. ``visitor`` (ui.train.visitor_state):
    whose training results a public app lets this browser use."""
    visitor = visitor if visitor is not None else gr.State(None)
    try:
        d = engine.defaults()
    except ValueError:  # the start-up model failed to load (the notice says so): A1111's defaults
        d = ModelDefaults("", 512, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, MAX_CLIP_SKIP)
    with gr.Row():
        model = gr.Dropdown(engine.model_choices(public), value=engine.startup_choice(public), label="Model",
                            allow_custom_value=not public, scale=4,
                            info="Hub id (org/name[@revision]), local folder, or embedded")
        load_btn = gr.Button("Load", scale=1)
    model_status = gr.Markdown(notice or engine.model_status(), elem_id="model-status")
    loaded = gr.State("")
    with gr.Row():
        with gr.Column(scale=5):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a red circle on a blue background")
            # the model card's example prompts (Hub widget): a first image that the model understands, in one click
            example_list = gr.Dataset(components=[prompt], samples=[[e] for e in d.examples], label="Examples",
                                      visible=bool(d.examples), elem_id="examples")
            negative = gr.Textbox("", label="Negative prompt", lines=2)
            c = sampling_controls(d)
            sampler, schedule, steps, width, height, batch, cfg, seed, fast = (
                c.sampler, c.schedule, c.steps, c.width, c.height, c.batch, c.cfg, c.seed, c.fast)
            with gr.Accordion("Hires. fix", open=False, elem_id="hires"):
                hires_on = gr.Checkbox(False, label="Hires. fix: generate, enlarge, redraw at the larger size",
                                       elem_id="hires-on")
                with gr.Row():
                    hires_upscaler = gr.Dropdown(list(HIRES_UPSCALERS), value=GenerationParams.hires_upscaler,
                                                 label="Upscaler")
                    hires_steps = gr.Slider(0, MAX_STEPS, value=0, step=1, label="Hires steps",
                                            info="0 = as many as the first pass")
                with gr.Row():
                    hires_strength = gr.Slider(0, 1, value=DEFAULT_HIRES_STRENGTH, step=0.01,
                                               label="Denoising strength")
                    hires_scale = gr.Slider(1, MAX_HIRES_SCALE, value=2, step=0.05, label="Upscale by",
                                            elem_id="hires-scale")
                with gr.Row():
                    hires_width = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Resize width to",
                                            info="0 = by the factor")
                    hires_height = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Resize height to")
            with gr.Accordion("X/Y/Z plot", open=False, elem_id="xyz"):
                gr.Markdown("Pick a parameter per axis and list its values (`3, 5, 7`, `10-30 (+10)`, `1-2 [5]`; "
                            "Prompt S/R: the text in the prompt, then its replacements). Generate then makes one "
                            "image per combination and a labelled grid.")
                xyz_inputs = []
                for axis in ("X", "Y", "Z"):
                    with gr.Row():
                        xyz_inputs.append(gr.Dropdown(list(XYZ_AXES), value="Nothing", label=f"{axis} type",
                                                      scale=1, elem_id=f"xyz-{axis.lower()}-type"))
                        xyz_inputs.append(gr.Textbox("", label=f"{axis} values", scale=3,
                                                     elem_id=f"xyz-{axis.lower()}-values"))
            # a public app shows LoRAs only when training is on (and then takes only its own results)
            with gr.Row(visible=not public if allow_loras is None else allow_loras):
                lora = gr.Textbox("", label="LoRA", scale=3, elem_id="lora",
                                  placeholder="training run, folder, .safetensors or Hub repo[:scale], comma-separated")
                trained = gr.Dropdown([] if public else engine.trained_results(), value=None, scale=2,
                                      label="Add a trained result", elem_id="trained-results",
                                      info="finished runs of the Train tab")
            with gr.Accordion("Advanced", open=False):
                clip_skip = gr.Slider(1, d.max_clip_skip, value=1, step=1, label="Clip skip")
                cfg_cutoff = gr.Slider(0, 1, value=GenerationParams.cfg_cutoff, step=0.05, label="CFG cutoff (fast)",
                                       info="after this share of the steps, skip the negative prompt's pass: 0.6 "
                                            "is about 1.25x faster; 1 = off", elem_id="cfg-cutoff")
                deep_cache = gr.Slider(1, MAX_DEEP_CACHE, value=GenerationParams.deep_cache, step=1,
                                       label="Deep cache (fast)", elem_id="deep-cache",
                                       info="run the UNet's deep blocks every N steps and reuse their features in "
                                            "between (DeepCache): 3 is about 1.5-2x faster; 1 = off")
                tiny_vae = gr.Checkbox(GenerationParams.tiny_vae, label="Tiny VAE (fast)", elem_id="tiny-vae",
                                       info="decode with TAESD (downloaded once; or the model's own tiny VAE): "
                                            "10-15x faster decoding, softer fine detail")
                autocast = gr.Checkbox(GenerationParams.autocast, label="bf16 autocast (fast)", elem_id="autocast",
                                       info="the UNet and the VAE's decoder compute in bf16, their weights stay "
                                            "fp32: faster on a CPU with AVX-512 BF16 or AMX (only there)")
        with gr.Column(scale=6):
            with gr.Row():
                run_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=2)
                # ZeroGPU lends its GPU to a request, not to a job that runs after it has answered
                queue_btn = gr.Button("Queue", elem_id="queue-btn", visible=not zerogpu.active(), scale=1)
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
            gallery = results_gallery("gallery")
            send_img2img = gr.Button("Send to img2img", size="sm", elem_id="send-img2img")
            preview = gr.Image(label="Live preview", interactive=False, height=160)
            status = gr.Markdown("", elem_id="run-status")
            infotext = gr.Textbox(label="Generation parameters", lines=4, interactive=False, elem_id="infotext")
            with gr.Accordion("Queue", open=True, elem_id="queue"):
                queue_table = gr.Dataframe(headers=["place", "state", "kind", "prompt"], value=[],
                                           interactive=False, wrap=True, elem_id="queue-table")
                with gr.Row():
                    earlier = gr.Button("↑ Earlier", size="sm", elem_id="queue-earlier")
                    later = gr.Button("↓ Later", size="sm", elem_id="queue-later")
                    cancel = gr.Button("✕ Cancel", size="sm", elem_id="queue-cancel")
    infos = gr.State([])
    picked = gr.State(0)  # the gallery's selected image (a new result selects none: its first is sent)
    hires = [hires_on, hires_scale, hires_steps, hires_strength, hires_upscaler, hires_width, hires_height]
    tab = GenerateTab(prompt, negative, sampler, schedule, steps, cfg, width, height, seed, batch, clip_skip, lora,
                      model, cfg_cutoff, deep_cache, fast, tiny_vae, autocast, hires, send_img2img, gallery, infos,
                      picked, loaded)

    inputs = tab.param_components() + [model, lora, cfg_cutoff, *hires, *xyz_inputs,
                                       deep_cache, fast, tiny_vae, autocast, visitor]
    outputs = [gallery, preview, status, infotext, infos]
    generate_fn = make_generate_fn(engine, public)
    run_btn.click(generate_fn, inputs, outputs, api_name="generate", trigger_mode="multiple", **run_events(gallery))
    prompt.submit(generate_fn, inputs, outputs, api_visibility="private", **run_events(gallery))
    names = [n for n in inspect.signature(generate_fn).parameters if n not in ("request", "progress")]  # = inputs
    queue_btn.click(make_enqueue_fn(engine, public, names), inputs, status, api_visibility="private",
                    preprocess=False, queue=False)
    wire_queue(engine, public, visitor, queue_table, gr.State(None), gr.State(""), (earlier, later, cancel),
               gr.Timer(QUEUE_REFRESH_S))

    wire_run_controls(engine, c, stop_btn, gallery, infos, infotext, picked)
    for trigger in (load_btn.click, model.select):  # the Load button, or picking a model from the list
        trigger(_load_model_fn(engine, public), [model, clip_skip],
                [model_status, width, height, cfg, sampler, steps, clip_skip, example_list, model, loaded],
                api_visibility="private", concurrency_id="device", concurrency_limit=1, show_progress_on=model_status)
    example_list.click(lambda sample: sample[0], example_list, prompt, api_visibility="private")
    trained.focus(lambda who: gr.update(choices=engine.trained_results(public, who)), visitor, trained,
                  api_visibility="private")
    trained.select(add_lora, [lora, trained], [lora, trained], api_visibility="private")
    return tab
