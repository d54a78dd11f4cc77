"""The generation queue and history: every run (Generate, img2img, X/Y/Z, the API, the Queue button) is a job here,
run one at a time on the device in the order submitted. A visitor sees their jobs' places, cancels or reorders
their own waiting jobs, and finds finished ones in a history kept in the outputs folder (it survives a page reload
and a restart). On a public app each visitor sees only their own jobs and history (``public`` below).

The work of a job is a callable from the engine; nothing here knows torch or gradio.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .infotext import format_infotext

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, STOPPED, FAILED, CANCELLED = "queued", "running", "done", "stopped", "failed", "cancelled"
MAX_WAITING = 20  # jobs waiting across all visitors; beyond, a submission is refused with "queue full"
MAX_WAITING_PUBLIC = 5  # per visitor on a public app, so one visitor cannot fill the queue for everyone
HISTORY_FILE = "history.jsonl"  # under --outputs: one line per finished job that made images
HISTORY_SHOWN = 100  # newest entries a history panel lists
_STARTING = threading.Lock()  # one queue thread per process, however many first calls race


@dataclass(eq=False)
class Job:
    owner: str  # who may see and control it: the visitor (browser id or Hub name), else the API session
    key: str  # the run's Stop key (the browser session: its Stop button stops it)
    kind: str  # "txt2img", "img2img" or "xyz"
    label: str  # the prompt, for lists
    request: dict  # what re-runs it (JSON): params, model, loras, axes
    work: Callable  # work(on_step) -> (GenerationResult, [paths]), run on the queue's thread
    id: str = field(default_factory=lambda: secrets.token_hex(6))
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    events: queue.Queue = field(default_factory=queue.Queue)  # StepEvents while running, then None
    finished: threading.Event = field(default_factory=threading.Event)
    result: object = None
    paths: list = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class Entry:
    """A finished job in the history."""

    id: str
    owner: str  # a hash of the job's owner (the file never holds a visitor's browser id)
    kind: str
    time: float
    label: str
    state: str
    seconds: float
    paths: list[str]  # relative to the outputs folder
    infotexts: list[str]
    request: dict


def owner_hash(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:16]


class RunQueue:
    """Jobs in submission order, run one at a time by a thread of this process (made again in a forked worker, as
    ZeroGPU's). ``may_start()`` holds the queue (a training job holding the GPU); ``stop(job)`` asks a running job
    to end after its current step."""

    def __init__(self, history: Path, may_start: Callable[[], bool] = lambda: True,
                 stop: Callable[[Job], None] = lambda job: None):
        self.history_path = history
        self.may_start, self._stop = may_start, stop
        self._pid = None

    def _ensure(self) -> None:
        if self._pid == os.getpid():
            return
        with _STARTING:
            if self._pid == os.getpid():
                return
            # a fork copies the lists and maybe a held lock, but not the thread
            self._cv = threading.Condition()
            self._waiting: list[Job] = []
            self._running: Job | None = None
            threading.Thread(target=self._loop, name="sd_demo-queue", daemon=True).start()
            self._pid = os.getpid()

    # ------------------------------------------------------------------ submitting and watching
    def submit(self, job: Job, public: bool = False) -> Job:
        self._ensure()
        with self._cv:
            if len(self._waiting) >= MAX_WAITING:
                raise ValueError(f"queue: full ({MAX_WAITING} jobs waiting); try again when some have finished")
            if public and sum(j.owner == job.owner for j in self._waiting) >= MAX_WAITING_PUBLIC:
                raise ValueError(f"queue: you have {MAX_WAITING_PUBLIC} jobs waiting; cancel one or wait for one "
                                 "to start")
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def ahead(self, job: Job) -> int:
        """Jobs that run before this one (the running one included); 0 once it runs."""
        self._ensure()
        with self._cv:
            if job not in self._waiting:
                return 0
            return self._waiting.index(job) + (self._running is not None)

    def active(self, owner: str | None = None) -> list[tuple[Job, int]]:
        """(job, jobs ahead of it) of the running and waiting jobs, in run order; only ``owner``'s unless None."""
        self._ensure()
        with self._cv:
            order = ([self._running] if self._running else []) + list(self._waiting)
        return [(j, n) for n, j in enumerate(order) if owner is None or j.owner == owner]

    # ------------------------------------------------------------------ a visitor's controls
    def find(self, job_id: str, owner: str | None) -> Job:
        """A running or waiting job of ``owner`` (any owner for None), else the ValueError of one not there."""
        for job, _ in self.active(owner):
            if job.id == job_id:
                return job
        raise ValueError("queue: that job is no longer waiting (it has started, finished or been cancelled)")

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue at once; a running one stops after its current step."""
        self._ensure()
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                job.state = CANCELLED
                job.events.put(None)
                job.finished.set()
                return
        if job.state == RUNNING:
            self._stop(job)

    def move(self, job: Job, delta: int, owner: str | None) -> None:
        """Swap a waiting job with the next waiting job of the same owner before (delta -1) or after it (+1): a
        visitor reorders only their own jobs, never past someone else's turn (None: any job, a private app)."""
        self._ensure()
        with self._cv:
            if job not in self._waiting:
                raise ValueError("queue: that job has already started")
            mine = [n for n, j in enumerate(self._waiting) if owner is None or j.owner == owner]
            k = mine.index(self._waiting.index(job)) + delta
            if 0 <= k < len(mine):
                a, b = self._waiting.index(job), mine[k]
                self._waiting[a], self._waiting[b] = self._waiting[b], self._waiting[a]

    # ------------------------------------------------------------------ the worker
    def _ready(self) -> bool:
        try:
            return bool(self._waiting) and self.may_start()
        except Exception:  # (a training job's state file half-written): ask again in a second, never die
            log.exception("queue: could not tell whether a job may start")
            return False

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._ready():
                    self._cv.wait(timeout=1.0)  # may_start changes without a notify (a training job ends)
                job = self._waiting.pop(0)
                job.state, self._running = RUNNING, job
            try:
                job.result, job.paths = job.work(job.events.put)
                job.state = STOPPED if getattr(job.result, "interrupted_at", None) is not None else DONE
                if job.paths:  # in the history before anyone hears that it ended
                    self._record(job)
            except BaseException as exc:  # the watcher re-raises it; the queue goes on
                job.error, job.state = exc, FAILED
            finally:
                with self._cv:
                    self._running = None
                job.events.put(None)
                job.finished.set()

    # ------------------------------------------------------------------ the history
    def _record(self, job: Job) -> None:
        root = self.history_path.parent
        r = job.result
        entry = Entry(job.id, owner_hash(job.owner), job.kind, job.created, job.label, job.state,
                      round(getattr(r, "seconds", 0.0), 2),
                      [os.path.relpath(p, root) for p in job.paths],
                      [format_infotext(i) for i in getattr(r, "infotexts", [])], job.request)
        try:
            root.mkdir(parents=True, exist_ok=True)
            with self.history_path.open("a", encoding="utf-8") as f:  # one write a line: forked workers append too
                f.write(json.dumps(entry.__dict__) + "\n")
        except OSError as exc:  # the images are saved; only the history misses them
            log.warning("history: could not record job %s: %s", job.id, exc)

    def history(self, owner: str | None) -> list[Entry]:
        """Finished jobs of ``owner`` (all for None), newest first, with the images still on disk (absolute paths)."""
        if not self.history_path.is_file():
            return []
        root, want = self.history_path.parent, None if owner is None else owner_hash(owner)
        entries = []
        for line in self.history_path.read_text(encoding="utf-8").splitlines():
            try:
                entry = Entry(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by a crash: skip it
                continue
            if want is not None and entry.owner != want:
                continue
            entry.paths = [str((root / p).resolve()) for p in entry.paths]
            if entry.paths and all(Path(p).is_file() for p in entry.paths[:1]):
                entries.append(entry)
        return entries[::-1][:HISTORY_SHOWN]

    def stamp(self) -> list[int] | None:
        """Changes when the history file does (a page re-reads it only then)."""
        try:
            st = self.history_path.stat()
        except OSError:
            return None
        return [st.st_mtime_ns, st.st_size]

    def entry(self, entry_id: str, owner: str | None) -> Entry:
        for entry in self.history(owner):
            if entry.id == entry_id:
                return entry
        raise ValueError("history: pick an entry first")
