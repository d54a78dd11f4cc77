"""The one backend object the UI and the CLI talk to: current model, generation, saved outputs.

It holds the pipeline cache and the run settings (device, dtype, attention) so a UI module only passes plain
values and gets plain values back (images, paths, text), and never imports torch.
"""
from __future__ import annotations

import contextvars
import dataclasses
import datetime as _dt
import functools
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import hub, zerogpu
from .generate import GenerationParams, GenerationResult, StepEvent, generate
from .infotext import format_infotext, write_png
from .models import (DEFAULT_STEPS, EMBEDDED_DIR, LoadedModel, PipelineCache, parse_loras, parse_model_ref,
                     public_name)
from .runqueue import CANCELLED, HISTORY_FILE, QUEUED, Entry, Job, RunQueue

log = logging.getLogger(__name__)


# under --outputs: the generated images (A1111's folders), the only files a page serves from there
IMAGES = "txt2img-images"
IMG2IMG_IMAGES = "img2img-images"
GRIDS = "txt2img-grids"  # X/Y/Z plots (A1111's folder); their cells go to IMAGES
IMAGE_FOLDERS = (IMAGES, IMG2IMG_IMAGES, GRIDS)


@dataclass
class EngineSettings:
    model: str = "embedded"  # loaded at start-up and used when a request names no model
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    allow_pickle: bool = False
    outputs: str = "outputs"  # PNGs land in outputs/txt2img-images/YYYY-MM-DD/ as in A1111 (IMAGES)
    compile: str = ""  # "torch" or "openvino" (models.compile_pipeline), "" for none


@dataclass
class ModelDefaults:
    """What the UI sets its controls to when a model loads: its native size, card CFG scale, sampler and steps, the
    deepest clip skip its text encoder has layers for, and the example prompts its card lists."""

    status: str
    size: int
    guidance: float
    sampler: str
    max_clip_skip: int
    examples: tuple[str, ...] = ()
    steps: int = DEFAULT_STEPS


class _Stop(threading.Event):
    """A run's Stop flag: set in this process, or (ZeroGPU) by another process through the file ``marker``."""

    def __init__(self, marker: Path | None = None):
        super().__init__()
        self.marker = marker

    def is_set(self) -> bool:
        return super().is_set() or (self.marker is not None and self.marker.exists())


HEARTBEAT_S = 2.0  # the longest a run's stream goes without an update (see Engine.watch)


@dataclass
class RunUpdate:
    """One update of a generation run for the UI: a step, a wait message, the finished result, or nothing (a
    heartbeat)."""

    step: StepEvent | None = None
    waiting: str = ""  # why the run has not started yet (a training job holds the GPU)
    result: GenerationResult | None = None
    paths: list[Path] | None = None


def next_free_path(folder: Path, seed: int) -> Path:
    """A1111-style '00012-<seed>.png', created exclusively so two runs never overwrite each other's files."""
    folder.mkdir(parents=True, exist_ok=True)
    index = len(list(folder.glob("*.png")))
    while True:
        path = folder / f"{index:05d}-{seed}.png"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return path
        except FileExistsError:
            index += 1


def save_result(result: GenerationResult, folder: Path) -> list[Path]:
    paths = []
    for image, info, seed in zip(result.images, result.infotexts, result.seeds):
        path = next_free_path(folder, seed)
        write_png(image, path, info)
        paths.append(path)
    return paths


class DeviceThread:
    """The one OS thread that runs this process's torch work (loading, generating, captioning).

    PyTorch's CPU ops run on an OpenMP thread team per calling thread, and while a second live thread has a team
    (the main thread that loaded the model, gradio's long-lived handler threads) both run at about half speed on
    a 2-core machine: 0.83 s an image on the embedded model becomes 1.55 s (BENCHMARKS.md, issue 19). A process
    forked later (ZeroGPU's worker) starts a thread of its own: the parent's is not copied into it."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._here = threading.local()

    def submit(self, fn, *args, **kwargs) -> Future:
        """``fn(...)`` queued for the device thread, in the caller's context (gradio's progress tracking is one)."""
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="sd_demo-device", initializer=self._mark)
            return self._pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)

    def call(self, fn, *args, **kwargs):
        """``fn(...)`` on the device thread (directly when already on it), its result or exception here."""
        if getattr(self._here, "pid", None) == os.getpid():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def _mark(self) -> None:
        self._here.pid = os.getpid()


DEVICE = DeviceThread()


def on_device(method):
    """Run an Engine method on the device thread (DeviceThread)."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        return DEVICE.call(method, *args, **kwargs)
    return call


class Engine:
    def __init__(self, settings: EngineSettings | None = None):
        from .train.jobs import JobManager

        self.settings = settings or EngineSettings()
        self.cache = PipelineCache()
        self.jobs = JobManager(Path(self.settings.outputs) / "train")  # training runs, one folder each
        self._jobs: dict[str, threading.Event] = {}  # job key (UI session) -> its Stop flag
        self._jobs_lock = threading.Lock()
        self._used: dict[str, float] = {}  # repo id (or "embedded") -> when it last ran here (the Models tab)
        # every generation waits its turn here; a training job on the GPU holds the queue (no out-of-memory crash)
        self.queue = RunQueue(Path(self.settings.outputs) / HISTORY_FILE,
                              may_start=lambda: not self._gpu_held(),
                              stop=lambda job: self.cancel(job.key))

    # ------------------------------------------------------------------ models
    @on_device
    def load(self, spec: str | None = None, tqdm_class=None) -> LoadedModel:
        s = self.settings
        m = self.cache.get(
            spec or s.model,
            device=s.device,
            dtype=s.dtype,
            attention=s.attention,
            allow_pickle=s.allow_pickle,
            tqdm_class=tqdm_class,
            compile=s.compile,
        )
        name = m.ref.hub_id or ("embedded" if m.ref.source == "embedded" else None)
        if name:  # (the cache's own times are its files' reads, where the disk keeps them)
            self._used[name] = time.time()
        return m

    def _offered(self, public: bool) -> dict[str, str]:
        """{name shown: model spec} of the model selector: the embedded model (when built), the start-up model,
        the loaded one, cached Hub models. A public app shows no path of this machine: a local folder by its
        name (ModelRef.public_name), which only this mapping turns back into the folder."""
        specs = (["embedded"] if (EMBEDDED_DIR / "model_index.json").exists() else []) + [self.settings.model]
        specs += [m.ref.label for m in [self.cache.current] if m] + hub.cached_pipelines()
        offered: dict[str, str] = {}
        for spec in specs:
            offered.setdefault(public_name(spec) if public else spec, spec)
        return offered

    def model_choices(self, public: bool = False) -> list[str]:
        return list(self._offered(public))

    def startup_choice(self, public: bool = False) -> str:
        """The selector's value for the start-up model."""
        return public_name(self.settings.model) if public else self.settings.model

    def current_choice(self, public: bool = False) -> str:
        """The selector's value for the loaded model, else for the start-up model."""
        m = self.cache.current
        return (public_name(m.ref.label) if public else m.ref.label) if m else self.startup_choice(public)

    def chosen_model(self, name: str | None, public: bool) -> str | None:
        """The model spec a selector value (or an API caller's ``model``) names; a public app takes only what it
        offers (no custom Hub ids or local paths: they download or read what a visitor chooses)."""
        if not name or not public:
            return name or None
        if name not in (offered := self._offered(True)):
            raise ValueError(f"model: '{name}' is not offered on this public app; pick one from the list")
        return offered[name]

    def family(self, spec: str | None = None) -> str:
        """'embedded', 'sd1', 'sd2' or 'sdxl' of a model, from its config files (nothing is loaded); the loaded
        model's for None; 'sdxl' (the largest) when it cannot be told yet."""
        from .models import peek

        m = self.cache.current
        if spec is None and m is not None:
            return "embedded" if m.ref.source == "embedded" else m.family
        return (peek(spec or self.settings.model) or ("sdxl",))[0]

    def default_steps(self, spec: str | None = None) -> int:
        """The steps a request that names none gets: the loaded model's for None, else read from the card."""
        from .models import peek_steps

        m = self.cache.current
        return m.default_steps if spec is None and m is not None else peek_steps(spec or self.settings.model)

    def model_status(self) -> str:
        m = self.cache.current
        return m.describe() if m else "no model loaded"

    def defaults(self, spec: str | None = None) -> ModelDefaults:
        """Load ``spec`` and return what the UI sets from it; None: the loaded model's (a start-up model that
        failed to load is not tried again here: the UI already shows why)."""
        if spec is None and self.cache.current is None:
            raise ValueError("no model loaded")
        m = self.load(spec) if spec else self.cache.current
        return ModelDefaults(m.describe(), m.default_size, m.default_guidance, m.default_sampler, m.max_clip_skip,
                             m.examples, m.default_steps)

    # ------------------------------------------------------------------ the Hub and the cache (the Models tab)
    def search_hub(self, text: str, kind: str = "model", sort: str = "downloads",
                   public: bool = False) -> list[hub.Found]:
        """Hub pipelines, or LoRAs made for the loaded model (when it is a Hub model; else LoRAs of any base)."""
        m = self.cache.current
        return hub.search(text, kind, m.ref.hub_id if m and kind == "lora" else None, sort, public=public)

    def download(self, spec: str, kind: str = "model", public: bool = False,
                 on_progress: Callable[[int, int, float | None], None] | None = None,
                 allow_pickle: bool | None = None) -> str:
        """Fetch a Hub model (only the files one pipeline needs) or a LoRA / embedding repo into the HF cache;
        returns what to use: the model's id, or the adapter's local .safetensors file for the LoRA list.
        ``on_progress(done, total, bytes_per_s)`` follows the bytes. ``allow_pickle``: the app's --allow-pickle
        unless told (a download a stranger's PNG asked for never takes pickles)."""
        if public:  # a visitor's choice of repo would fill this machine's disk
            raise ValueError("download: not offered on this public app; the owner downloads with --model or the "
                             "Models tab of a private app (--auth, or no --share)")
        ref = parse_model_ref(spec)
        if ref.source != "hub":
            raise ValueError(f"download: '{spec}' is not a Hub repo id; use 'org/name' or 'org/name@revision'")
        bar = hub.progress_bar(on_progress) if on_progress else None
        if kind == "model":
            pickle = self.settings.allow_pickle if allow_pickle is None else allow_pickle
            hub.fetch_model(ref.name, ref.revision, want_fp16=self._device() != "cpu", allow_pickle=pickle,
                            tqdm_class=bar)
            return ref.label
        return str(hub.fetch_adapter(ref.name, ref.revision, tqdm_class=bar))

    def locate_model(self, name: str | None, public: bool = False) -> tuple[str | None, str | None]:
        """The model an image's parameters name: (selector value when it is here, Hub id to offer downloading when
        it is not); (None, None) when neither (a public app downloads nothing)."""
        name = (name or "").strip()
        if not name:
            return None, None
        if name in self._offered(public):
            return name, None
        try:
            ref = parse_model_ref(name)
        except ValueError:
            return None, None
        return None, (ref.label if not public and ref.source == "hub" and hub.REVISION.match(ref.revision or "main")
                      else None)

    def locate_loras(self, text: str | None, public: bool = False, visitor: str | None = None
                     ) -> tuple[list[str], list[str], list[str]]:
        """The LoRAs an image's parameters name ("name:scale, ..."): (entries for the LoRA list, for those here: a
        Hub LoRA in the cache or a training run of this app; "hub_id:scale" of those to offer downloading; names
        not found). A public app offers no downloads, and only the visitor's own runs."""
        here, fetch, unknown = [], [], []
        runs = self._usable_runs(public, visitor)
        for name, scale in parse_loras(text):
            if name in runs:
                here.append(f"{name}:{scale:g}")
                continue
            if hub.REPO_ID.match(name) and not public:
                try:
                    here.append(f"{hub.fetch_adapter(name, cached_only=True)}:{scale:g}")
                except ValueError:
                    fetch.append(f"{name}:{scale:g}")
                continue
            unknown.append(name)
        return here, fetch, unknown

    def cached_models(self) -> list[hub.CachedRepo]:
        """The shipped embedded model, then every repo of the HF cache, last used first."""
        shipped = []
        if (EMBEDDED_DIR / "model_index.json").exists():
            size = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
            shipped = [hub.CachedRepo("embedded", "pipeline (shipped)", size, EMBEDDED_DIR.stat().st_mtime)]
        shipped, cached = ([dataclasses.replace(r, last_used=max(r.last_used, self._used.get(r.repo_id, 0.0)))
                            for r in repos] for repos in (shipped, hub.cached_repos()))
        return shipped + sorted(cached, key=lambda r: -r.last_used)

    def use_cached(self, repo_id: str, public: bool = False) -> tuple[str, str]:
        """('model', its id) for a cached pipeline, ('lora', its file) for a cached LoRA or embedding: what the
        Generate tab's model box or LoRA list takes."""
        if public:
            raise ValueError("use: the cache is not offered on this public app")
        kind = next((r.kind for r in self.cached_models() if r.repo_id == repo_id), None)
        if kind is None:
            raise ValueError(f"use: '{repo_id}' is not on this machine; download it first")
        if kind.startswith("pipeline"):
            return "model", repo_id
        if kind not in ("LoRA", "embedding"):
            raise ValueError(f"use: '{repo_id}' is neither a model nor a LoRA or embedding")
        return "lora", str(hub.fetch_adapter(repo_id, cached_only=True))

    def delete_cached(self, repo_id: str, public: bool = False) -> int:
        if public:
            raise ValueError("delete: not offered on this public app")
        if repo_id == "embedded":
            raise ValueError("delete: the embedded model is part of the app, not of the cache")
        m, running = self.cache.current, self.jobs.running()
        if m is not None and m.ref.hub_id == repo_id:
            raise ValueError(f"delete: '{repo_id}' is the loaded model; load another one first")
        if running and self.jobs.view(running).config.get("model", "").split("@")[0] == repo_id:
            raise ValueError(f"delete: '{repo_id}' is the base of the training run in progress")
        return hub.delete_cached(repo_id)

    # ------------------------------------------------------------------ training (jobs live in self.jobs)
    def stage_training_data(self, paths: list[str], public: bool = False):
        """Uploaded files -> a fresh dataset folder under outputs/train-data (kept: resuming a job needs it)."""
        from .train import staging

        # A random tail: on a shared app a folder name another visitor could guess would show them these images.
        stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(8)}"
        return staging.stage(paths, Path(self.settings.outputs) / "train-data" / stamp, public=public)

    def _staged(self, folder: str) -> Path:
        """A dataset folder this engine staged (no other path of the server is written to)."""
        root = (Path(self.settings.outputs) / "train-data").resolve()
        path = Path(folder).resolve()
        if path.parent != root or not path.is_dir():
            raise ValueError("data: upload the training images again")
        return path

    def staged_data(self, folder: str):
        """What a staged folder holds now (a page reload shows it again): images, captions, skipped files."""
        from .train import staging

        return staging.inventory(self._staged(folder))

    def save_captions(self, folder: str, rows: list[tuple[str, str]]):
        from .train import staging

        return staging.write_captions(self._staged(folder), rows)

    @on_device
    def auto_caption(self, folder: str, model_id: str, trigger: str | None = None, overwrite: bool = False,
                     public: bool = False):
        """Caption a staged folder's images with an image-to-text model (see train.autocaption): (inventory,
        captions written). A public app offers only the default captioner (no downloads of visitors' choosing);
        on a GPU busy with training it runs on the CPU."""
        from .train.autocaption import DEFAULT_CAPTIONER, caption_folder

        model_id = (model_id or "").strip() or DEFAULT_CAPTIONER
        if public and model_id != DEFAULT_CAPTIONER:
            raise ValueError(f"captioner: this public app offers only {DEFAULT_CAPTIONER}")
        device = "cpu" if self.jobs.running() else self._device()
        return caption_folder(self._staged(folder), model_id, trigger, overwrite, device)

    # On a public app (share link, Space) each visitor sees and controls only their own training runs: their
    # images, samples and weights are theirs. ``visitor`` is a Space visitor's Hugging Face name when signed in,
    # else a random id that their browser keeps (sd_demo.ui.train.visitor_state); a private app shows every run.
    def visible_jobs(self, public: bool = False, visitor: str | None = None) -> list[str]:
        """Job ids this visitor may see, newest first."""
        jobs = self.jobs.jobs()
        return jobs if not public else [j for j in jobs if visitor and self.jobs.owner(j) == visitor]

    def own_job(self, job_id: str, public: bool = False, visitor: str | None = None) -> str:
        """``job_id`` if this visitor may see and control it, else the ValueError of a job that is not there
        (another visitor's run is not even named)."""
        if not job_id:
            raise ValueError("no training job selected")
        if public and (not visitor or self.jobs.owner(job_id) != visitor):
            raise ValueError(f"no training job '{job_id}'")
        return job_id

    def running_job(self, public: bool = False, visitor: str | None = None) -> str | None:
        """The running job, if this visitor may see it (a page reload re-attaches to it)."""
        job = self.jobs.running()
        return job if job and (not public or (visitor and self.jobs.owner(job) == visitor)) else None

    def lora_sources(self, loras: list[tuple[str, float]], public: bool = False,
                     visitor: str | None = None) -> list[tuple[str, float]]:
        """A LoRA list as what it loads: the name of a finished adapter run this visitor may use (what the Train
        tab writes there, rather than a path of this machine) is its folder; anything else is itself. A public app
        takes only those runs (ValueError otherwise)."""
        runs = self._usable_runs(public, visitor)
        out = [(str(self.jobs.root / src) if src in runs else src, scale) for src, scale in loras]
        if public and not all(self._is_run(src, runs) for src, _ in out):
            raise ValueError("lora: on a public app only your own training results (Train tab) can be used")
        return out

    def is_training_result(self, source: str, public: bool = False, visitor: str | None = None) -> bool:
        """Is ``source`` the output folder of a finished adapter run of this app that this visitor may use? (Public
        apps allow only those as LoRAs.)"""
        return self._is_run(source, self._usable_runs(public, visitor))

    def _is_run(self, source: str, runs: set[str]) -> bool:
        folder = Path(source).resolve()
        return folder.parent == self.jobs.root.resolve() and folder.name in runs

    def _usable_runs(self, public: bool, visitor: str | None) -> set[str]:
        return {run for _, run in self.trained_results(public, visitor)}

    def trained_results(self, public: bool = False, visitor: str | None = None) -> list[tuple[str, str]]:
        """(label, run name) of finished adapter / embedding runs this visitor may use, newest first: the Generate
        tab's list (a LoRA list entry: lora_sources)."""
        from .train.jobs import FINISHED

        out = []
        for job in self.visible_jobs(public, visitor):
            view = self.jobs.summary(job)
            if view.state == FINISHED and self.use_training_result(job)[0] == "lora":
                base = public_name(view.config.get("model", ""))
                out.append((f"{job} ({view.config.get('method')}, {base})", job))
        return out

    def use_training_result(self, job_id: str) -> tuple[str, str]:
        """('lora', folder) for an adapter or embedding, ('model', folder) for a full fine-tune, of a finished job."""
        from .train.jobs import FINISHED

        view = self.jobs.view(job_id)
        if view.state != FINISHED:
            raise ValueError(f"job {job_id} is {view.state}; use it once it has finished")
        from .train.config import TrainConfig
        from .train.methods import method_spec

        return ("model" if method_spec(TrainConfig(**view.config)).is_model else "lora"), str(view.folder)

    def push_result(self, job_id: str, repo_id: str, public: bool = False,
                    visitor: tuple[str, str] | None = None) -> str:
        """A finished run to a private Hub repo; its URL. A private app pushes with the owner's token (HF_TOKEN or
        the login); a public one (a Space with training on) only with the visitor's own Hugging Face login
        (``visitor``: user name, token), only a run that visitor started, and only into the visitor's account."""
        repo_id = (repo_id or "").strip()
        if not public:
            return self.jobs.push(job_id, repo_id)
        if visitor is None:
            raise ValueError("push: sign in with Hugging Face (the button above) to push to your own account")
        user, token = visitor
        if self.jobs.owner(job_id) != user:  # signed in when it started: a run kept by a browser id is not
            raise ValueError("push: only the visitor who trained a run can push it (sign in before you train)")
        repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
        if repo_id.split("/")[0] != user:
            raise ValueError(f"push: on this public app you push to your own account: '{user}/NAME'")
        return self.jobs.push(job_id, repo_id, token=token)

    def training_note(self) -> str:
        """Empty, or how a running training job affects generation on this device."""
        job = self.jobs.running()
        if not job:
            return ""
        if self._on_gpu():
            return f"waiting: training job {job} is using the GPU; this image starts when it stops or finishes"
        return f"training job {job} is running: generation shares the CPU cores with it and is slower"

    def _device(self) -> str:
        from .models import pick_device

        return pick_device(self.settings.device)

    def _on_gpu(self) -> bool:
        return self._device() != "cpu"

    def _gpu_held(self) -> bool:
        """A training job holds the GPU: generation waits (never an out-of-memory crash beside it)."""
        return self._on_gpu() and bool(self.jobs.running())

    # ------------------------------------------------------------------ generation
    def cancel(self, job: str = "default") -> bool:
        """Ask ``job`` to stop after its current step (the Stop button); False when it is not running.

        Keyed per job so that on a shared link one visitor's Stop never stops another visitor's image. On ZeroGPU
        the run is in the worker process ZeroGPU forked for the request, which sees a file, not this process's flag.
        """
        with self._jobs_lock:
            event = self._jobs.get(job)
        if event is not None:
            event.set()
        elif zerogpu.active():
            marker = self._stop_marker(job)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            return True
        return event is not None

    def _stop_marker(self, job: str) -> Path:
        return Path(self.settings.outputs) / ".stop" / hashlib.sha256(job.encode()).hexdigest()[:32]

    def generating(self, job: str = "default") -> bool:
        with self._jobs_lock:
            return job in self._jobs

    @on_device
    def generate(
        self,
        params: GenerationParams,
        model: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
        save: bool = True,
        job: str = "default",
        loras: list[tuple[str, float]] | None = None,
        init_image=None,
        mask=None,
    ) -> tuple[GenerationResult, list[Path]]:
        """``generate.generate`` on the loaded (or named) model with these LoRAs; saved under --outputs unless
        ``save`` is off. ``init_image`` (PIL): image to image; with ``mask`` (white = redraw): inpainting."""
        params.validate()  # fail on bad input before a possibly slow model load
        marker = self._stop_marker(job) if zerogpu.active() else None
        if marker is not None:
            marker.unlink(missing_ok=True)  # a Stop pressed after the last run ended
        cancel = _Stop(marker)
        with self._jobs_lock:
            self._jobs[job] = cancel  # before the load: a Stop while the model loads stops it at its first step
        try:
            loaded = self.load(model)
            with loaded.lock:
                loaded.set_loras(loras or [])
            result = generate(loaded, params, init_image=init_image, mask=mask, on_step=on_step, cancel=cancel)
        finally:
            with self._jobs_lock:
                self._jobs.pop(job, None)
            if marker is not None:
                marker.unlink(missing_ok=True)
        if loras:  # infotext names them (A1111 puts <lora:name:scale> in the prompt; we keep the prompt as typed)
            for info in result.infotexts:
                version = info.params.pop("Version", None)
                info.params["Lora"] = ", ".join(f"{hub.adapter_name(src)}:{scale:g}" for src, scale in loras)
                if version:
                    info.params["Version"] = version
        paths: list[Path] = []
        if save:
            day = _dt.date.today().isoformat()
            folder = IMAGES if init_image is None else IMG2IMG_IMAGES
            paths = save_result(result, Path(self.settings.outputs) / folder / day)
        for info in result.infotexts:
            log.info("generated: %s", format_infotext(info).replace("\n", " | "))
        return result, paths

    # ------------------------------------------------------------------ the queue (sd_demo.runqueue)
    def enqueue(self, params: GenerationParams, model: str | None = None, job: str = "default",
                loras: list[tuple[str, float]] | None = None, init_image=None, mask=None,
                axes: list[tuple[str, str]] | None = None, owner: str | None = None,
                public: bool = False) -> Job:
        """A generation (``axes``: an X/Y/Z plot of ``params``, sd_demo.xyz) added to the queue; bad input fails
        here, before it waits. ``job`` is its Stop key (the browser session), ``owner`` who sees it in the queue
        and history (the visitor; ``job`` when None)."""
        params = params.validate()
        loras = list(loras or [])
        request = {"params": dataclasses.asdict(params), "model": model, "loras": loras, "axes": axes}
        if axes:
            from . import xyz

            parsed = [xyz.parse_axis(name, values) for name, values in axes]
            plan = xyz.cells(params, parsed, model, loras)
            named = any(a.name == "Checkpoint" for a in parsed)  # its values are selector names; a bad one fails
            specs = {c.model: self.chosen_model(c.model, public) if named else c.model for c in plan}

            def work(on_step):
                return self._plot(plan, parsed, specs, job, on_step)
            kind = "xyz"
        else:
            def work(on_step):
                return self.generate(params, model=model, on_step=on_step, job=job, loras=loras,
                                     init_image=init_image, mask=mask)
            kind = "txt2img" if init_image is None else "img2img"
        return self.queue.submit(Job(owner or f"session:{job}", job, kind, params.prompt, request, work), public)

    def watch(self, job: Job) -> Iterator[RunUpdate]:
        """A queued job as a stream of updates: its place while it waits (or why: a training job holds the GPU),
        each denoising step, then the result. Closing the stream early (the client went away) cancels it, or
        stops it after its current step."""
        shown, last = "", time.monotonic()
        try:
            while True:
                if job.state == QUEUED and (note := self.queue_note(job)) != shown:
                    shown, last = note, time.monotonic()
                    yield RunUpdate(waiting=note or "starting")  # (the jobs ahead have finished)
                try:
                    ev = job.events.get(timeout=0.5)
                except queue.Empty:
                    # An empty update now and then: a client that left can only be noticed (the stream closed)
                    # between two yields, and a wait or a model load may go on for minutes without one.
                    if time.monotonic() - last > HEARTBEAT_S:
                        last = time.monotonic()
                        yield RunUpdate()
                    continue
                if ev is None:
                    break
                last = time.monotonic()
                yield RunUpdate(step=ev)
        finally:
            if not job.finished.is_set():
                self.queue.cancel(job)
        if job.error is not None:
            raise job.error
        if job.state == CANCELLED:
            yield RunUpdate(waiting="cancelled before it started")
            return
        yield RunUpdate(result=job.result, paths=job.paths)

    def queue_note(self, job: Job) -> str:
        """Why a queued job waits: a training job on the GPU, or the jobs ahead of it; empty when it is next."""
        if self._gpu_held():
            return self.training_note()
        n = self.queue.ahead(job)
        return f"queued: {n} job{'s' if n != 1 else ''} ahead of this one" if n else ""

    def run(self, params: GenerationParams, model: str | None = None, job: str = "default",
            loras: list[tuple[str, float]] | None = None, init_image=None, mask=None,
            axes: list[tuple[str, str]] | None = None, owner: str | None = None,
            public: bool = False) -> Iterator[RunUpdate]:
        """``enqueue`` and ``watch``: a generation (or an X/Y/Z plot) as a stream of updates."""
        yield from self.watch(self.enqueue(params, model, job, loras, init_image, mask, axes, owner, public))

    def _plot(self, plan, parsed, specs: dict, job: str, on_step) -> tuple[GenerationResult, list[Path]]:
        """An X/Y/Z plot's cells, each generated (and saved) as an ordinary image, the steps counted over all
        cells; the result holds the labelled grid (saved under txt2img-grids) and then every cell. A Stop ends the
        plot after the current cell's step. The cells run checkpoint-first: each model loads once."""
        from . import xyz

        results, paths = [], []
        for k, cell in enumerate(plan):
            def step(ev, k=k):
                on_step(StepEvent(k * ev.total + ev.step, len(plan) * ev.total, ev.elapsed, ev.previews))
            result, saved = self.generate(cell.params, model=specs[cell.model], on_step=step, job=job,
                                          loras=list(cell.loras))
            results.append(result)
            paths += saved
            if result.interrupted_at is not None:
                break
        images = [r.images[0] for r in results]
        infos = [r.infotexts[0] for r in results]
        seeds = [r.seeds[0] for r in results]
        if len(results) == len(plan):  # the grid wants x, y, z order
            order = sorted(range(len(plan)), key=lambda n: (plan[n].z, plan[n].y, plan[n].x))
            sheet = xyz.grid([images[n] for n in order], parsed)
            grid_path = save_result(GenerationResult([sheet], [infos[0]], [plan[0].params.seed]),
                                    Path(self.settings.outputs) / GRIDS / _dt.date.today().isoformat())
            images, infos, paths, seeds = [sheet, *images], [infos[0], *infos], [*grid_path, *paths], seeds[:1] + seeds
        return GenerationResult(images, infos, seeds, results[-1].interrupted_at,
                                seconds=sum(r.seconds for r in results)), paths

    # a visitor's queue and history: on a public app only their own (``owner``), on a private one everything
    def queued(self, owner: str | None, public: bool = False) -> list[tuple[Job, int]]:
        """(job, jobs ahead of it) of the running and waiting jobs, in run order."""
        return self.queue.active(owner if public else None)

    def cancel_queued(self, job_id: str, owner: str | None, public: bool = False) -> None:
        self.queue.cancel(self.queue.find(job_id, owner if public else None))

    def move_queued(self, job_id: str, delta: int, owner: str | None, public: bool = False) -> None:
        who = owner if public else None
        self.queue.move(self.queue.find(job_id, who), delta, who)

    def history(self, owner: str | None, public: bool = False) -> list[Entry]:
        return self.queue.history(owner if public else None)

    def rerun(self, entry_id: str, owner: str, job: str, public: bool = False) -> Job:
        """A history entry's request queued again (a random seed stays random). An img2img entry's source picture
        is not kept: it is re-run from the img2img tab."""
        entry = self.queue.entry(entry_id, owner if public else None)
        if entry.kind == "img2img":
            raise ValueError("re-run: an img2img job starts from its picture; send its result to img2img instead")
        r = entry.request
        try:
            params = GenerationParams(**r["params"])
            loras = [(src, float(scale)) for src, scale in r["loras"]]
        except (KeyError, TypeError, ValueError):  # written by another version of the app
            raise ValueError("re-run: this entry's request cannot be read here; send it to Generate instead") from None
        if public and (r["model"] and r["model"] not in self._offered(True).values()
                       or not all(self.is_training_result(src, True, owner) for src, _ in loras)):
            raise ValueError("re-run: its model or LoRA is no longer offered here")
        axes = [tuple(a) for a in r["axes"]] if r.get("axes") else None
        return self.enqueue(params, r["model"], job, loras, axes=axes, owner=owner, public=public)
