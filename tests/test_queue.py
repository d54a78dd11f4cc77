"""The generation queue and history (sd_demo.runqueue): order, a visitor's cancel and reorder, per-visitor views,
and a history that outlives the process. The work here is a stand-in that waits for the test's go; the app's
real runs through the queue are in test_app.py and test_browser_queue.py."""
import threading
import time
from types import SimpleNamespace

import pytest

from sd_demo.runqueue import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Job, RunQueue, owner_hash


class Works:
    """Jobs whose work records its start and waits until released (so the test decides when each ends)."""

    def __init__(self, folder):
        self.folder, self.started, self.gates = folder, [], {}

    def job(self, owner: str, name: str, fail: bool = False) -> Job:
        gate = self.gates[name] = threading.Event()

        def work(on_step):
            self.started.append(name)
            on_step(("step", name))
            assert gate.wait(10), "the test never released " + name
            if fail:
                raise ValueError(f"{name} failed")
            path = self.folder / f"{name}.png"
            path.write_bytes(b"png")
            return SimpleNamespace(seconds=0.5, infotexts=[], interrupted_at=None), [path]

        return Job(owner, f"session-{owner}", "txt2img", f"prompt {name}", {"params": {"prompt": name}}, work)


def _wait(cond, what: str):
    deadline = time.time() + 10
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def works(tmp_path):
    return Works(tmp_path)


def test_jobs_run_one_at_a_time_in_submission_order(tmp_path, works):
    q = RunQueue(tmp_path / "history.jsonl")
    jobs = [q.submit(works.job(owner, f"{owner}{n}")) for n in range(3) for owner in "ab"]
    _wait(lambda: works.started == ["a0"], "the first job did not start")
    assert [q.ahead(j) for j in jobs] == [0, 1, 2, 3, 4, 5] and jobs[0].state == RUNNING
    for n, job in enumerate(jobs):
        assert job.events.get(timeout=5) == ("step", job.label.split()[1])
        assert works.started[-1] == job.label.split()[1] and len(works.started) == n + 1  # nothing started early
        works.gates[job.label.split()[1]].set()
        assert job.finished.wait(5) and job.state == DONE and job.events.get(timeout=1) is None
    assert [e.label for e in q.history(None)] == [f"prompt {o}{n}" for n in range(3) for o in "ab"][::-1]


def test_cancelling_a_waiting_job_removes_only_it(tmp_path, works):
    q = RunQueue(tmp_path / "history.jsonl")
    first, second, third = (q.submit(works.job("a", name)) for name in ("a0", "a1", "a2"))
    _wait(lambda: works.started == ["a0"], "the first job did not start")
    q.cancel(second)
    assert second.state == CANCELLED and second.finished.is_set() and second.events.get_nowait() is None
    assert [j for j, _ in q.active()] == [first, third] and q.ahead(third) == 1
    for name in ("a0", "a2"):
        works.gates[name].set()
    _wait(lambda: third.state == DONE, "the third job did not run")
    assert works.started == ["a0", "a2"]


def test_cancelling_the_running_job_asks_it_to_stop(tmp_path, works):
    stopped = []
    q = RunQueue(tmp_path / "history.jsonl", stop=stopped.append)
    job = q.submit(works.job("a", "a0"))
    _wait(lambda: job.state == RUNNING, "the job did not start")
    q.cancel(job)
    assert stopped == [job]
    works.gates["a0"].set()


def test_a_visitor_reorders_only_their_own_waiting_jobs(tmp_path, works):
    q = RunQueue(tmp_path / "history.jsonl")
    running = q.submit(works.job("b", "b0"))
    a1, b1, a2, a3 = (q.submit(works.job(name[0], name)) for name in ("a1", "b1", "a2", "a3"))
    _wait(lambda: running.state == RUNNING, "the first job did not start")
    q.move(a3, -1, "a")  # before a2: only a's jobs swap places
    assert [j for j, _ in q.active()] == [running, a1, b1, a3, a2]
    q.move(a3, -1, "a")  # before a1, not before b1's turn: a1 takes a3's old place
    assert [j for j, _ in q.active()] == [running, a3, b1, a1, a2]
    q.move(a3, -1, "a")  # already a's first: nothing moves
    assert [j for j, _ in q.active()] == [running, a3, b1, a1, a2]
    q.move(b1, 1, "b")  # b has no later job
    assert [j for j, _ in q.active("b")] == [running, b1] and [n for _, n in q.active("b")] == [0, 2]
    with pytest.raises(ValueError, match="already started"):
        q.move(running, 1, "b")
    with pytest.raises(ValueError, match="no longer waiting"):
        q.find(a1.id, "b")  # another visitor's job is not found for b
    for gate in works.gates.values():
        gate.set()


def test_a_public_app_caps_each_visitors_waiting_jobs(tmp_path, works, monkeypatch):
    import sd_demo.runqueue as rq

    monkeypatch.setattr(rq, "MAX_WAITING_PUBLIC", 2)
    monkeypatch.setattr(rq, "MAX_WAITING", 4)
    q = RunQueue(tmp_path / "history.jsonl", may_start=lambda: False)  # nothing starts: all wait
    q.submit(works.job("a", "a0"), public=True)
    q.submit(works.job("a", "a1"), public=True)
    with pytest.raises(ValueError, match="you have 2 jobs waiting"):
        q.submit(works.job("a", "a2"), public=True)
    q.submit(works.job("b", "b0"), public=True)
    q.submit(works.job("a", "a3"))  # a private app has no per-visitor cap
    with pytest.raises(ValueError, match="queue: full"):
        q.submit(works.job("c", "c0"), public=True)
    assert all(j.state == QUEUED for j, _ in q.active())


def test_history_is_per_owner_survives_a_restart_and_skips_failures(tmp_path, works):
    q = RunQueue(tmp_path / "history.jsonl")
    jobs = [q.submit(works.job(owner, name, fail=name == "a1")) for owner, name in
            (("a", "a0"), ("b", "b0"), ("a", "a1"))]
    for job in jobs:
        works.gates[job.label.split()[1]].set()
        job.finished.wait(5)
    assert jobs[2].state == FAILED and str(jobs[2].error) == "a1 failed"
    again = RunQueue(tmp_path / "history.jsonl")  # a new process reads the same file
    assert [e.label for e in again.history("a")] == ["prompt a0"]
    assert [e.label for e in again.history(None)] == ["prompt b0", "prompt a0"]
    entry = again.entry(jobs[0].id, "a")
    assert entry.paths == [str((tmp_path / "a0.png").resolve())] and entry.request == {"params": {"prompt": "a0"}}
    with pytest.raises(ValueError):
        again.entry(jobs[0].id, "b")  # b cannot reach a's entry
    text = (tmp_path / "history.jsonl").read_text()
    assert '"a"' not in text and owner_hash("a") in text  # the file holds no visitor id
    (tmp_path / "a0.png").unlink()  # a deleted image drops its entry
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"id": "cut sh')  # a line cut short by a crash is skipped
    assert again.history("a") == [] and len(again.history(None)) == 1


def test_engine_history_re_runs_a_job_and_shows_a_public_visitor_only_their_own(tiny_model_dirs, tmp_path):
    """Through the engine on the tiny SD 1.x model: a finished job is in its owner's history (a private app shows
    every job), Re-run queues the same request again (a fixed seed gives the same pixels; an X/Y/Z plot its grid
    again), another visitor of a public app can neither see nor re-run it, and an img2img job is refused."""
    import numpy as np
    from PIL import Image

    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    params = GenerationParams(prompt="a red square", steps=2, seed=7)
    first = list(engine.run(params, job="s1", owner="~ann", public=True))[-1]
    [entry] = engine.history("~ann", public=True)
    assert entry.label == "a red square" and entry.paths == [str(first.paths[0].resolve())]
    assert engine.history("~bob", public=True) == [] and len(engine.history(None)) == 1
    with pytest.raises(ValueError, match="pick an entry"):
        engine.rerun(entry.id, "~bob", "s2", public=True)
    again = list(engine.watch(engine.rerun(entry.id, "~ann", "s1", public=True)))[-1]
    assert np.array_equal(np.asarray(Image.open(again.paths[0])), np.asarray(Image.open(first.paths[0])))
    plot = list(engine.run(params, job="s1", owner="~ann", axes=[("Seed", "1, 2")], public=True))[-1]
    newest = engine.history("~ann", public=True)[0]
    assert newest.kind == "xyz" and len(newest.paths) == 3  # the grid and its two cells
    replot = list(engine.watch(engine.rerun(newest.id, "~ann", "s1", public=True)))[-1]
    assert len(replot.paths) == 3 and replot.result.images[0].size == plot.result.images[0].size
    src = Image.new("RGB", (64, 64), (200, 30, 30))
    list(engine.run(GenerationParams(prompt="x", steps=2, seed=1), job="s1", owner="~ann", init_image=src))
    with pytest.raises(ValueError, match="send its result to img2img"):
        engine.rerun(engine.history("~ann", public=True)[0].id, "~ann", "s1", public=True)


def test_the_queue_survives_a_failing_may_start(tmp_path, works):
    """A check that raises once (a training job's state file half-written) is asked again; the queue goes on."""
    calls = []

    def may_start():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("half-written")
        return True

    q = RunQueue(tmp_path / "history.jsonl", may_start=may_start)
    job = q.submit(works.job("a", "a0"))
    works.gates["a0"].set()
    assert job.finished.wait(10) and job.state == DONE


def test_a_stream_closed_while_its_job_waits_cancels_it(tiny_model_dirs, tmp_path):
    """Gradio can close a run's stream (its client left) only between two updates: a job that waits for minutes
    still yields now and then, so closing its stream takes it out of the queue."""
    from sd_demo.engine import HEARTBEAT_S, Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    engine.queue.may_start = lambda: False  # nothing starts (as behind a long job)
    stream = engine.run(GenerationParams(prompt="x", steps=1), job="s1")
    t0 = time.time()
    update = next(stream)
    assert update.step is None and update.result is None and time.time() - t0 < HEARTBEAT_S + 2
    [(job, _)] = engine.queued(None)
    stream.close()
    assert job.state == CANCELLED and engine.queued(None) == []


def test_stop_while_the_model_loads_stops_the_run(tiny_model_dirs, tmp_path):
    """A Stop (or the queue panel's Cancel of a running job) that comes while the job loads its model is kept."""
    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    real = engine.load

    def slow_load(spec=None, tqdm_class=None):
        assert engine.cancel("s1")  # pressed while loading: the run is already registered
        return real(spec, tqdm_class)

    engine.load = slow_load
    result, _ = engine.generate(GenerationParams(prompt="x", steps=20, seed=1), job="s1", save=False)
    assert result.interrupted_at is not None and result.interrupted_at < 20
