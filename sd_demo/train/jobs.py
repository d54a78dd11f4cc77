"""Training jobs for the app: each run trains in its own OS process and keeps all its state in its folder.

A job folder is the run's ``--out`` folder plus four files: ``job.json`` (the config), ``events.jsonl`` (one line
per progress event, appended as it happens), ``status.json`` (state, pid, result or error; replaced atomically) and
``train.log`` (the process's output). The UI never holds a job in memory: a page reload, a second tab or a
restarted server reads the folder again, and a job whose process is gone without a final status is "interrupted".
A crash in training (even out of memory) takes down only its own process.

``python -m sd_demo.train.jobs DIR`` is the process: it trains the folder's config and writes the files.

On ZeroGPU (sd_demo.zerogpu) a GPU is lent only inside a request, to a process ZeroGPU forks for it: a job there
trains in slices (``run_slice``), each one such call that ends with a checkpoint when its time is up, and waits
"paused" in between; the Training tab calls the next slice while the visitor's page is open, and Resume goes on
after they leave.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import exit_on_sigterm, setup_logging
from .config import TrainConfig

log = logging.getLogger(__name__)

JOB, EVENTS, STATUS, LOG, STOP = "job.json", "events.jsonl", "status.json", "train.log", "STOP"
RUNNING, FINISHED, STOPPED, FAILED, CANCELLED, INTERRUPTED, PAUSED = (
    "running", "finished", "stopped", "failed", "cancelled", "interrupted", "paused")
# Working files of a run, never published or downloaded: checkpoints, generated class images, the job's own files.
NOT_PUBLISHED = ("checkpoints/*", "checkpoints-earlier-*/*", "class_images/*", ".tmp-*", JOB, EVENTS, STATUS, LOG,
                 STOP)
RESUMABLE = (STOPPED, INTERRUPTED, FAILED, PAUSED)  # a checkpoint may exist: Resume continues from the latest one


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # readers never see half a file


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class JobView:
    """What the UI shows of a job, read from its folder."""

    id: str
    folder: Path
    state: str
    config: dict
    step: int = 0
    total: int = 0
    sec_per_step: float = 0.0
    eta_sec: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), last value per step
    samples: list[Path] = field(default_factory=list)  # the newest validation grid
    sample_step: int = 0
    messages: list[str] = field(default_factory=list)  # preset, estimates, warnings, the error
    error: str = ""
    files: list[str] = field(default_factory=list)  # result files, once finished

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    def loss_rows(self, smoothing: float = 0.9) -> list[tuple[int, float, str]]:
        """(step, value, series) for a plot: the raw loss and its exponential moving average."""
        rows, ema = [], None
        for step, loss in self.losses:
            if loss != loss:  # NaN: nothing to draw
                continue
            ema = loss if ema is None else smoothing * ema + (1 - smoothing) * loss
            rows += [(step, loss, "loss"), (step, ema, "smoothed")]
        return rows

    def progress_line(self) -> str:
        line = f"**{self.state}** · step {self.step}/{self.total or '?'}"
        if self.state == RUNNING and self.sec_per_step:
            line += f" · {self.sec_per_step:.2f} s/step · ETA {self.eta_sec / 60:.1f} min"
        if self.final_loss is not None:
            line += f" · loss {self.final_loss:.4f}"
        return line

    @property
    def resumable(self) -> bool:
        return self.state in RESUMABLE or self.state == FINISHED


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:32] or "run"


def _alive(pid: int, folder: Path) -> bool:
    """Is ``pid`` still this job's process? (A reused pid runs something else; a zombie is dead.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and str(folder) in cmdline


class JobManager:
    """Starts, follows, stops and resumes training jobs under ``root``; one running job at a time (one device)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._procs: dict[str, subprocess.Popen] = {}  # reaped on poll, so a finished child is no zombie
        self._slicing: set[str] = set()  # jobs whose slice runs in a request now (ZeroGPU's process for it)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- start / control
    def start(self, cfg: TrainConfig, name: str | None = None, owner: str | None = None) -> str:
        """A new job folder for ``cfg`` (its ``out`` is set to the folder) and its process; returns the job id.
        ``owner``: who started it (ui.train.visitor_state), on a public app the only one who may see it. On ZeroGPU
        the job is left paused for ``run_slice``."""
        with self._lock:
            self._refuse_if_busy()
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            job_id = f"{stamp}-{_slug(name or cfg.trigger or cfg.method)}"
            folder = self.root / job_id
            folder.mkdir(parents=True, exist_ok=False)
            cfg.out, cfg.overwrite, cfg.resume = str(folder.resolve()), True, None  # the folder holds our files
            cfg.validate()
            _write_json(folder / JOB, {"config": asdict(cfg), "created": stamp, "owner": owner})
            self._launch(job_id)
            return job_id

    def resume(self, job_id: str, more_steps: int = 0) -> None:
        """Continue a stopped / interrupted job from its latest checkpoint, or train a finished one ``more_steps``."""
        with self._lock:
            self._refuse_if_busy()
            view = self.view(job_id)
            if not view.resumable:
                raise ValueError(f"job {job_id} is {view.state}; only stopped, interrupted or finished jobs resume")
            folder = self.folder(job_id)
            if not _has_checkpoint(folder) and view.state != PAUSED:  # a paused job's first slice may not have run
                raise ValueError("this job has no checkpoint yet; start it again instead")
            job = _read_json(folder / JOB)
            cfg = job["config"]
            if more_steps:  # from where it is now: a finished run trains on, a stopped one ends sooner or later
                cfg["steps"] = view.step + int(more_steps)
            elif view.state == FINISHED:
                raise ValueError("this job has finished; give how many more steps to train")
            cfg.update(resume="latest", overwrite=False)
            _write_json(folder / JOB, job)
            (folder / STOP).unlink(missing_ok=True)
            self._launch(job_id)

    def run_slice(self, job_id: str, seconds: float) -> str:
        """Train a paused job in this process (ZeroGPU's, inside a GPU call) until ``seconds`` are up: it then
        checkpoints after its current step (one step at least) and is paused again, unless it finished or was
        stopped. Returns its state."""
        folder = self.folder(job_id)
        if _read_json(folder / STATUS).get("state") != PAUSED:
            return self.state(job_id)
        job = _read_json(folder / JOB)  # a later slice goes on from where the last one ended
        resume = _has_checkpoint(folder)
        job["config"].update(resume="latest" if resume else None, overwrite=not resume)
        _write_json(folder / JOB, job)
        run_job(folder, deadline=time.monotonic() + seconds)
        return self.state(job_id)

    @contextlib.contextmanager
    def slicing(self, job_id: str):
        """Around a ``run_slice`` call made elsewhere (ZeroGPU's process): the job shows as running meanwhile."""
        self._slicing.add(job_id)
        try:
            yield
        finally:
            self._slicing.discard(job_id)

    def stop(self, job_id: str) -> None:
        """Ask the job to checkpoint and stop after its current step (a job paused between slices stops now)."""
        folder = self.folder(job_id)
        if job_id not in self._slicing and _read_json(folder / STATUS).get("state") == PAUSED:
            _write_json(folder / STATUS, {"state": STOPPED})
            return
        (folder / STOP).touch()

    def cancel(self, job_id: str) -> None:
        """End the job now, without a checkpoint; its folder and earlier checkpoints stay."""
        if job_id in self._slicing:  # a slice runs in a process we did not start: it stops at its next step
            (self.folder(job_id) / STOP).touch()
        status = _read_json(self.folder(job_id) / STATUS)
        pid = status.get("pid")
        if pid and _alive(pid, self.folder(job_id)):
            os.killpg(pid, signal.SIGTERM)  # its own process group (start_new_session): the whole job ends
            self._reap(job_id, wait=True)
        status.update(state=CANCELLED, error="cancelled")
        _write_json(self.folder(job_id) / STATUS, status)

    # ---------------------------------------------------------------- reading
    def folder(self, job_id: str) -> Path:
        folder = (self.root / job_id).resolve()
        if folder.parent != self.root.resolve() or not (folder / JOB).is_file():
            raise ValueError(f"no training job '{job_id}'")
        return folder

    def owner(self, job_id: str) -> str | None:
        return _read_json(self.folder(job_id) / JOB).get("owner")

    def jobs(self) -> list[str]:
        """Job ids, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if (p / JOB).is_file()), reverse=True)

    def running(self) -> str | None:
        return next((j for j in self.jobs() if self.state(j) == RUNNING), None)

    def state(self, job_id: str) -> str:
        folder = self.folder(job_id)
        self._reap(job_id)
        status = _read_json(folder / STATUS)
        state = status.get("state", RUNNING)
        if job_id in self._slicing and state in (RUNNING, PAUSED):
            return RUNNING
        if state == RUNNING and not (status.get("pid") and _alive(status["pid"], folder)):
            # starting up (no status yet) for a few seconds, else its process is gone without a word
            started = job_started(folder)
            return RUNNING if job_id in self._procs and time.time() - started < 60 else INTERRUPTED
        return state

    def view(self, job_id: str) -> JobView:
        folder = self.folder(job_id)
        status = _read_json(folder / STATUS)
        view = JobView(job_id, folder, self.state(job_id), _read_json(folder / JOB).get("config", {}),
                       error=status.get("error", ""), files=status.get("files", []))
        for ev in read_events(folder):
            _apply_event(view, ev)
        view.losses = sorted(dict(view.losses).items())
        if view.error:
            view.messages.append(f"error: {view.error}")
        return view

    def summary(self, job_id: str) -> JobView:
        """A cheap view for lists: state, config and the last step event (the end of the log only)."""
        folder = self.folder(job_id)
        view = JobView(job_id, folder, self.state(job_id), _read_json(folder / JOB).get("config", {}))
        for ev in read_events(folder, tail_bytes=4096):
            if not ev.get("message"):
                _apply_event(view, ev)
        return view

    def log_tail(self, job_id: str, lines: int = 20) -> str:
        try:
            text = (self.folder(job_id) / LOG).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    # ---------------------------------------------------------------- results
    def result_files(self, job_id: str) -> list[Path]:
        """What a finished run hands over: adapter files (both formats), embeddings, the card, the samples."""
        import fnmatch

        folder = self.folder(job_id)
        return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            fnmatch.fnmatch(p.relative_to(folder).as_posix(), pat) for pat in NOT_PUBLISHED))

    def zip_result(self, job_id: str) -> Path:
        import zipfile

        if self.state(job_id) != FINISHED:
            raise ValueError("only a finished run can be downloaded; wait for it or train it to the end")
        folder = self.folder(job_id)
        dest = self.root / ".downloads" / f"{job_id}.zip"
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in self.result_files(job_id):
                zf.write(path, f"{job_id}/{path.relative_to(folder).as_posix()}")
        os.replace(tmp, dest)
        return dest

    def push(self, job_id: str, repo_id: str, private: bool = True, token: str | None = None) -> str:
        """Upload a finished run's results to a Hub model repo (private unless asked); returns its URL."""
        from ..hub import push_folder

        if self.state(job_id) != FINISHED:
            raise ValueError("only a finished run can be pushed")
        return push_folder(repo_id, self.folder(job_id), self.result_files(job_id), private=private, token=token)

    # ---------------------------------------------------------------- internals
    def _refuse_if_busy(self) -> None:
        busy = self.running()
        if busy:
            raise ValueError(f"training job {busy} is running; one job at a time per device: stop it first")

    def _launch(self, job_id: str) -> None:
        """Its own process, or on ZeroGPU paused for its first slice."""
        from .. import zerogpu

        if zerogpu.active():
            _write_json(self.folder(job_id) / STATUS, {"state": PAUSED})
        else:
            self._spawn(job_id)

    def _spawn(self, job_id: str) -> None:
        folder = self.folder(job_id)
        (folder / STATUS).unlink(missing_ok=True)
        with open(folder / LOG, "ab") as out:
            self._procs[job_id] = subprocess.Popen(
                [sys.executable, "-m", "sd_demo.train.jobs", str(folder)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd=Path(__file__).resolve().parents[2])

    def _reap(self, job_id: str, wait: bool = False) -> None:
        proc = self._procs.get(job_id)
        if proc is not None and (proc.wait(30) if wait else proc.poll()) is not None:
            self._procs.pop(job_id, None)


def _has_checkpoint(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("step-*/state.json"))


def job_started(folder: Path) -> float:
    try:
        return (folder / JOB).stat().st_mtime
    except OSError:
        return 0.0


def read_events(folder: Path, tail_bytes: int | None = None) -> list[dict]:
    """The job's events, or those in the last ``tail_bytes`` of the file (the first line there may be cut)."""
    events = []
    try:
        with open(folder / EVENTS, "rb") as f:
            if tail_bytes:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:  # the line being written right now
            pass
    return events


def _apply_event(view: JobView, ev: dict) -> None:
    if ev.get("message"):
        view.messages.append(ev["message"])
        view.total = ev.get("total") or view.total
        return
    view.step, view.total = ev["step"], ev["total"]
    view.sec_per_step, view.eta_sec = ev.get("sec_per_step", 0.0), ev.get("eta_sec", 0.0)
    view.losses.append((ev["step"], ev["loss"]))
    if ev.get("samples"):
        view.samples, view.sample_step = [view.folder / s for s in ev["samples"]], ev["step"]


# -------------------------------------------------------------------- the job's own process
def _watch_stop(folder: Path, cancel: threading.Event, deadline: float | None, timed_out: threading.Event) -> None:
    while not cancel.is_set():
        if (folder / STOP).exists():
            cancel.set()
        elif deadline is not None and time.monotonic() >= deadline:
            timed_out.set()
            cancel.set()
        time.sleep(0.5)


def run_job(folder: Path, deadline: float | None = None) -> int:
    """Train ``folder``'s config, appending events and writing the final status. ``deadline`` (time.monotonic):
    a slice's end, after which it checkpoints and pauses."""
    from .loop import train

    cfg = TrainConfig(**_read_json(folder / JOB)["config"])
    _write_json(folder / STATUS, {"state": RUNNING, "pid": os.getpid()})
    cancel, timed_out = threading.Event(), threading.Event()
    threading.Thread(target=_watch_stop, args=(folder, cancel, deadline, timed_out), daemon=True).start()
    events = open(folder / EVENTS, "a")

    def on_event(ev) -> None:
        row = {k: getattr(ev, k) for k in ("step", "total", "loss", "lr", "sec_per_step", "eta_sec", "message")}
        if ev.images:
            (folder / "samples").mkdir(exist_ok=True)
            row["samples"] = []
            for i, img in enumerate(ev.images):
                rel = f"samples/step-{ev.step:06d}-{i}.png"
                img.save(folder / rel)
                row["samples"].append(rel)
        events.write(json.dumps(row, allow_nan=True) + "\n")
        events.flush()

    try:
        result = train(cfg, on_event=on_event, cancel=cancel)
    except ValueError as exc:  # the user's to fix: one line
        _write_json(folder / STATUS, {"state": FAILED, "error": str(exc)})
        return 2
    except SystemExit:  # SIGTERM: Cancel, which records the state itself
        raise
    except BaseException as exc:  # ours: the traceback goes to train.log, one line to the UI
        log.exception("training failed")
        first = str(exc).splitlines()[0] if str(exc) else ""
        _write_json(folder / STATUS, {"state": FAILED, "error": f"{type(exc).__name__}: {first}"})
        return 1
    finally:
        cancel.set()
        events.close()
    state = STOPPED if result.steps < result.preset.cfg.steps else FINISHED
    messages = [f"warning: {w}" for w in result.warnings]  # skipped files, upscaled images, "stopped"
    if state == STOPPED and timed_out.is_set() and not (folder / STOP).exists():
        state, messages = PAUSED, [f"paused at step {result.steps} (GPU slice over): the next slice goes on"]
    if _read_json(folder / STATUS).get("state") == CANCELLED:  # cancelled during a slice: it stays so
        (folder / STOP).unlink(missing_ok=True)
        return 0
    with open(folder / EVENTS, "a") as f:  # shown with the job
        f.writelines(json.dumps({"step": result.steps, "total": result.preset.cfg.steps, "message": m}) + "\n"
                     for m in messages)
    _write_json(folder / STATUS, {"state": state, "files": [str(Path(f).relative_to(folder)) for f in result.files
                                                            if Path(f).is_relative_to(folder)]})
    (folder / STOP).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    setup_logging(logging.INFO)
    exit_on_sigterm()
    sys.exit(run_job(Path(sys.argv[1])))
