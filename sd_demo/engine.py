"""The one backend object the UI and the CLI talk to: current model, generation, saved outputs.

It holds the pipeline cache and the run settings (device, dtype, attention) so a UI module only passes plain
values and gets plain values back (images, paths, text), and never imports torch.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import hub
from .generate import GenerationParams, GenerationResult, StepEvent, generate
from .infotext import format_infotext, write_png
from .models import EMBEDDED_DIR, LoadedModel, PipelineCache

log = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    model: str = "embedded"  # loaded at start-up and used when a request names no model
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    allow_pickle: bool = False
    outputs: str = "outputs"  # PNGs land in outputs/txt2img-images/YYYY-MM-DD/ as in A1111


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


class Engine:
    def __init__(self, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.cache = PipelineCache()
        self._jobs: dict[str, threading.Event] = {}  # job key (UI session) -> its Stop flag
        self._jobs_lock = threading.Lock()

    # ------------------------------------------------------------------ models
    def load(self, spec: str | None = None, tqdm_class=None) -> LoadedModel:
        s = self.settings
        return self.cache.get(
            spec or s.model,
            device=s.device,
            dtype=s.dtype,
            attention=s.attention,
            allow_pickle=s.allow_pickle,
            tqdm_class=tqdm_class,
        )

    def model_choices(self) -> list[str]:
        """What the model selector offers: the embedded model (when built), the start-up model, cached Hub models."""
        choices = ["embedded"] if (EMBEDDED_DIR / "model_index.json").exists() else []
        for spec in [self.settings.model, *(m.ref.label for m in [self.cache.current] if m)] + hub.cached_pipelines():
            if spec not in choices:
                choices.append(spec)
        return choices

    def model_status(self) -> str:
        m = self.cache.current
        return m.describe() if m else "no model loaded"

    # ------------------------------------------------------------------ generation
    def cancel(self, job: str = "default") -> bool:
        """Ask ``job`` to stop after its current step (the Stop button); False when it is not running.

        Keyed per job so that on a shared link one visitor's Stop never stops another visitor's image.
        """
        with self._jobs_lock:
            event = self._jobs.get(job)
        if event is not None:
            event.set()
        return event is not None

    def generate(
        self,
        params: GenerationParams,
        model: str | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
        save: bool = True,
        job: str = "default",
        loras: list[tuple[str, float]] | None = None,
    ) -> tuple[GenerationResult, list[Path]]:
        params.validate()  # fail on bad input before a possibly slow model load
        loaded = self.load(model)
        with loaded.lock:
            loaded.set_loras(loras or [])
        cancel = threading.Event()
        with self._jobs_lock:
            self._jobs[job] = cancel
        try:
            result = generate(loaded, params, on_step=on_step, cancel=cancel)
        finally:
            with self._jobs_lock:
                self._jobs.pop(job, None)
        if loras:  # infotext names them (A1111 puts <lora:name:scale> in the prompt; we keep the prompt as typed)
            for info in result.infotexts:
                version = info.params.pop("Version", None)
                info.params["Lora"] = ", ".join(f"{Path(src).name}:{scale:g}" for src, scale in loras)
                if version:
                    info.params["Version"] = version
        paths: list[Path] = []
        if save:
            day = _dt.date.today().isoformat()
            paths = save_result(result, Path(self.settings.outputs) / "txt2img-images" / day)
        for info in result.infotexts:
            log.info("generated: %s", format_infotext(info).replace("\n", " | "))
        return result, paths
