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


def test_training_is_refused_on_zerogpu(monkeypatch, tmp_path):
    from sd_demo.train import jobs
    from sd_demo.train.config import TrainConfig

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    with pytest.raises(ValueError, match="ZeroGPU lends its GPU only inside a request"):
        jobs.JobManager(tmp_path).start(TrainConfig(method="lora", model="embedded", data=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # nothing was started or written
