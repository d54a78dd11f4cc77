"""ZeroGPU (issue 18): the GPU time a generation asks for follows the request, and nothing changes off ZeroGPU."""
from __future__ import annotations

import pytest

from sd_demo import zerogpu
from sd_demo.engine import Engine, EngineSettings
from sd_demo.ui.generate import make_generate_fn, on_gpu

spaces = pytest.importorskip("spaces")


def test_the_duration_follows_steps_size_batch_and_family():
    base = zerogpu.generation_seconds("sd1", 100, 512, 512, 1)
    assert zerogpu.MIN_S < base < zerogpu.generation_seconds("sd1", 150, 512, 512, 1) < \
        zerogpu.generation_seconds("sd1", 150, 512, 512, 4)
    assert base < zerogpu.generation_seconds("sd1", 100, 1024, 1024, 1)
    assert base < zerogpu.generation_seconds("sdxl", 100, 1024, 1024, 1)
    assert zerogpu.generation_seconds("sd1", 100, None, None, 1) == base  # no size: the native one
    assert zerogpu.generation_seconds("sd1", 20, 512, 512, 1) == zerogpu.MIN_S  # a usual image: far under 60 s
    assert zerogpu.generation_seconds("embedded", 20, None, None, 1) == zerogpu.MIN_S  # far under the flat 60 s
    assert zerogpu.generation_seconds("sdxl", 150, 2048, 2048, 8) == zerogpu.MAX_S


def test_off_zerogpu_the_handler_is_unchanged(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def handler():
        return 1

    assert on_gpu(None, False, handler) is handler


def test_the_generate_handler_asks_for_its_own_duration(monkeypatch, tiny_model_dirs, tmp_path):
    asked = {}

    def gpu(fn, duration):  # spaces.GPU's stand-in: what a ZeroGPU Space would be told
        asked["duration"] = duration
        return fn

    monkeypatch.setattr(spaces, "GPU", gpu)
    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    make_generate_fn(engine, public=False)
    seconds = asked["duration"]
    # as gradio calls it: the inputs in order, then the request and the progress tracker
    assert seconds("a cat", "", "Euler a", "Automatic", 100, 7.0, 1024, 512, -1, 2, 1, None, "", None, None) == \
        zerogpu.generation_seconds("sd1", 100, 1024, 512, 2) > zerogpu.MIN_S
    assert seconds("a cat", steps=150, width=None, height=None, batch_size=1) == \
        zerogpu.generation_seconds("sd1", 150, None, None, 1) > zerogpu.MIN_S
    assert seconds("a cat", steps="many") == zerogpu.MIN_S  # refused by the handler itself, at once

    import gradio as gr

    from sd_demo.ui.mcp import add_tools

    with gr.Blocks():
        add_tools(engine, public=False)  # the MCP tool, read by the same rule (one image; steps 0: the default)
    tool = asked["duration"]
    assert tool("a cat", "", 100, 1024, 512) == zerogpu.generation_seconds("sd1", 100, 1024, 512, 1) > zerogpu.MIN_S
    assert tool("a cat") == zerogpu.generation_seconds("sd1", 20, None, None, 1)  # the card names no steps


def test_on_zerogpu_a_job_trains_in_gpu_slices_and_ends_as_an_unsliced_run_does(monkeypatch, tiny_model_dirs,
                                                                                 tmp_path):
    """ZeroGPU lends its GPU only inside a request: a job trains in slices of one GPU call each, every slice ending
    with a checkpoint and the job paused, and the last ends where one uninterrupted run ends. In the Training tab the
    slices run one after another while the page is open, each under spaces.GPU with the slice's duration, and the job
    shows as running meanwhile; another visitor of the public app cannot drive them."""
    import gradio as gr
    from safetensors.torch import load_file

    import app
    from sd_demo.train import jobs
    from tests.test_jobs import _cfg

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        from PIL import Image

        Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a blue zq square {i}")
    model = tiny_model_dirs["sd15"]
    manager = jobs.JobManager(tmp_path / "train")
    whole = manager.start(_cfg(model, data, steps=4, checkpoint_every=0, validation_every=0))
    assert manager.state(whole) == jobs.PAUSED  # nothing runs outside a request
    assert manager.run_slice(whole, 10**6) == jobs.FINISHED  # one long slice: the whole run

    asked, seen = [], []

    def gpu(fn=None, duration=None):  # spaces.GPU's stand-in for the slices: what a ZeroGPU Space would be told
        def decorate(f):
            if f.__name__ != "gpu_slice":  # the Generate tab's handlers
                return f

            def call(*args):
                seen.append(demo.engine.jobs.state(args[0]))
                asked.append(duration(*args))
                return f(*args)
            return call
        return decorate(fn) if fn else decorate

    monkeypatch.setattr(spaces, "GPU", gpu)
    monkeypatch.setattr(zerogpu, "SLICE_END_S", zerogpu.SLICE_S)  # a slice of no time: one step each
    demo = app.build_demo(app.parse_args(["--model", str(model), "--outputs", str(tmp_path / "out"), "--share",
                                          "--allow-training"]))
    train_slices = next(f.fn for f in demo.fns.values() if f.fn.__qualname__.endswith("train_slices"))
    job = demo.engine.jobs.start(_cfg(model, data, steps=4, checkpoint_every=0, validation_every=0), owner="~ann")
    with pytest.raises(gr.Error, match="no training job"):
        next(train_slices(job, "~bob"))
    shown = list(train_slices(job, "~ann"))
    assert asked == [zerogpu.SLICE_S] * 4 and seen == [jobs.RUNNING] * 4  # 4 slices of 1 step, shown running
    assert [s[1].split("**")[1] for s in shown] == [jobs.PAUSED] * 3 + [jobs.FINISHED]
    assert "paused at step 1" in shown[0][1]
    a, b = (load_file(str(f / "pytorch_lora_weights.safetensors"))
            for f in (demo.engine.jobs.folder(job), manager.folder(whole)))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_slice_asks_for_no_more_gpu_time_than_the_job_needs():
    """The first slice (no pace yet) asks for a whole slice; later ones for what the steps left need at the
    measured pace, with room for the load and the checkpoint, never less than one step's room nor more than a
    slice: a visitor with little quota left is not refused for time the job would not use."""
    assert zerogpu.slice_seconds(500, 0.0) == zerogpu.SLICE_S
    assert zerogpu.slice_seconds(500, 0.5) == zerogpu.SLICE_S
    assert zerogpu.slice_seconds(20, 0.5) == zerogpu.SLICE_END_S + 15 == zerogpu.SLICE_MIN_S  # 15 s of steps
    assert zerogpu.SLICE_MIN_S < zerogpu.slice_seconds(40, 0.5) < zerogpu.SLICE_S
    assert zerogpu.slice_seconds(0, 0.5) == zerogpu.SLICE_MIN_S


def test_on_zerogpu_stop_reaches_the_run_in_zerogpus_worker_process(monkeypatch, tiny_model_dirs, tmp_path):
    """On ZeroGPU a generation runs in a worker process that ZeroGPU forks for the request: its memory is a copy,
    so the Stop button (handled in the app's own process) reaches it through the outputs folder. Two engines over
    one folder stand in for the two processes."""
    import threading

    from sd_demo.generate import GenerationParams

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    settings = EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path))
    app_side, worker = Engine(settings), Engine(settings)
    stepping, out = threading.Event(), {}

    def run():
        out["result"], _ = worker.generate(GenerationParams(prompt="x", steps=150, seed=1), job="visitor-1",
                                           on_step=lambda ev: stepping.set())

    thread = threading.Thread(target=run)
    thread.start()
    assert stepping.wait(120)
    assert not app_side.generating("visitor-1")  # the run is not in this process
    assert app_side.cancel("visitor-1")
    thread.join(120)
    assert 0 < out["result"].interrupted_at < 150
    assert not any((tmp_path / ".stop").iterdir())  # the marker went with the run: the next one is not stopped
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert not app_side.cancel("visitor-1")  # off ZeroGPU a run elsewhere is not this engine's to stop
