"""The Generate tab's handlers called directly (no server): raw API values and the model-sized clip-skip slider."""
import gradio as gr
import pytest

from sd_demo.engine import Engine, EngineSettings
from sd_demo.ui.generate import _load_model_fn, build, make_generate_fn


@pytest.fixture
def engine(tiny_model_dirs, tmp_path):
    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    engine.load()
    return engine


def no_progress(*args, **kwargs):
    pass


def test_clip_skip_slider_ends_at_the_loaded_models_depth(engine, tiny_model_dirs):
    """It allowed 12 on every model (the embedded one has 3 layers): it ends where the text encoder does, and
    loading another model moves the end and keeps the value inside it."""
    with gr.Blocks():
        tab = build(engine)
    assert tab.clip_skip.maximum == 2  # the tiny SD encoder's 2 layers
    *_, clip, _, _, _ = _load_model_fn(engine, False)(str(tiny_model_dirs["sdxl"]), 2, progress=no_progress)
    assert (clip["maximum"], clip["value"]) == (1, 1)  # SDXL reads one layer back already


@pytest.mark.parametrize("kw,message", [
    ({"width": "abc"}, "width: 'abc' is not a number"), ({"batch_size": None}, "batch_size: missing"),
    ({"seed": 1.5}, "seed: 1.5 is not a whole number"), ({"height": 64.5}, "height: 64.5 is not a whole number"),
    ({"clip_skip": 3}, "clip_skip: 3 is out of range for this model"),
])
def test_raw_api_values_get_a_message_naming_the_field(engine, kw, message):
    run = make_generate_fn(engine, False)("a red circle", **{"steps": 1, **kw}, progress=no_progress)
    with pytest.raises(gr.Error, match=message):
        list(run)
