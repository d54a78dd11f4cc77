"""The shipped embedded model (assets/shapes-sd): loads through the app's normal path, obeys held-out prompts, and
is what the app uses when no model is named. Skips with a reason where the model is not built."""
from __future__ import annotations

import json
import math

import pytest

from sd_demo import hub, models

pytestmark = pytest.mark.skipif(not (models.EMBEDDED_DIR / "model_index.json").exists(),
                                reason="embedded model not built (assets/shapes-sd is missing)")

BAR = {"background": 0.95, "color": 0.90, "shape": 0.85, "position": 0.80}  # issue 4, held-out prompts

@pytest.fixture(scope="module")
def embedded():
    import torch

    torch.manual_seed(0)
    return models.load_model("embedded")


def test_layout_is_plain_stable_diffusion():
    index = json.loads((models.EMBEDDED_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["vae"][1] == "AutoencoderKL" and index["unet"][1] == "UNet2DConditionModel"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["tokenizer"][1] == "CLIPTokenizer"
    files = [p for p in models.EMBEDDED_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")], "weights must be safetensors"
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_loads_with_plain_diffusers():
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(models.EMBEDDED_DIR, use_safetensors=True)
    assert pipe.vae.config.latent_channels == 4 and len(pipe.vae.config.block_out_channels) == 4  # 8x
    assert pipe.unet.config.sample_size * 8 == 128
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # Free text tokenizes (byte fallback) without errors; caption words are single tokens.
    assert pipe.tokenizer.tokenize("a red star")[1] == "red</w>"
    assert len(pipe.tokenizer("zebras éclair 🙂").input_ids) > 2


def test_runs_with_plain_diffusers():
    """What a user who downloads the model does first: the stock pipeline, no dtype argument, on a CPU. An fp16
    text encoder beside the fp32 UNet diffusers makes failed here ("mat1 and mat2 must have the same dtype")."""
    import diffusers
    import numpy as np
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(models.EMBEDDED_DIR, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_model_card_recommends_the_sampler_and_cfg_scale_the_bar_was_measured_at(embedded):
    """README.md (Hub card format) names the sampler and CFG scale; TRAINING.md holds a table measured with them."""
    guidance, sampler = hub.recommended_guidance(models.EMBEDDED_DIR), hub.recommended_sampler(models.EMBEDDED_DIR)
    assert guidance is not None and embedded.default_guidance == guidance
    assert sampler is not None and embedded.default_sampler == sampler
    assert f"{sampler}, CFG {guidance:g}: " in (models.EMBEDDED_DIR / "TRAINING.md").read_text()


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_the_live_preview_shows_the_picture_forming(embedded, sampler):
    """Halfway through, the preview is already the picture the run ends with (the step's denoised estimate through
    the model's own small VAE), not the noise still in the latents."""
    import numpy as np
    from PIL import Image

    from sd_demo.generate import GenerationParams, generate

    events = []
    r = generate(embedded, GenerationParams(prompt="a small orange triangle at the bottom left on a white background",
                                            seed=5, sampler=sampler), on_step=events.append, preview_every=5)
    half = next(e.previews[0] for e in events if e.step == 10)
    final = np.asarray(r.images[0].resize(half.size, Image.Resampling.BILINEAR), dtype=float)
    off = np.abs(np.asarray(half, dtype=float) - final).mean()
    assert half.size == (64, 64) and off < 20, off  # measured 1-2 (the noisy latents: 120)


def test_clip_skip_stops_at_the_text_encoders_three_layers(embedded):
    from sd_demo.generate import GenerationParams, generate

    assert embedded.max_clip_skip == 3
    with pytest.raises(ValueError, match="clip_skip: 4 is out of range for this model.*use 1 to 3"):
        generate(embedded, GenerationParams(prompt="a red circle", steps=1, clip_skip=4))


@pytest.fixture(scope="module")
def heldout_run(embedded):
    """16 held-out prompts (8 canonical, 8 with size and position), seed 0, 20 steps, the model's default sampler and
    CFG scale (its card's, as the app uses them)."""
    from sd_demo.shapes.eval_model import heldout_prompts, run_eval

    assert embedded.default_size == 128
    return run_eval(embedded, heldout_prompts(16, seed=1), seeds=[0], steps=20, guidance=embedded.default_guidance)


@pytest.mark.parametrize("attribute", list(BAR))
def test_heldout_prompts_meet_the_bar(heldout_run, attribute):
    """The issue's bar, unchanged, on 16 held-out images (the full table is 64 prompts x 2 seeds, TRAINING.md)."""
    report = heldout_run.report
    need = math.ceil(BAR[attribute] * report.asked(attribute))
    failures = "\n".join(f"{p!r}: {r.summary()}" for p, r in zip(heldout_run.prompts, report.results) if not r.ok)
    assert report.correct(attribute) >= need, (
        f"{attribute}: {report.correct(attribute)}/{report.asked(attribute)} correct, need {need}\n{failures}")


def test_fast_keeps_what_the_prompts_ask_for(embedded, heldout_run):
    """The Fast choice (Deep cache 3, CFG cutoff 0.6, bf16 autocast where the CPU has it) on the same 16 held-out
    images: at most one image more gets an attribute wrong than at full work (issue 19: at most 5 points lost; 32
    prompts x 2 seeds lost none, see BENCHMARKS.md), and it did skip work: the deep blocks ran on 7 of the 20
    steps."""
    from sd_demo.shapes.eval_model import run_eval

    deep = []
    hook = embedded.pipe.unet.mid_block.resnets[0].register_forward_pre_hook(lambda *a: deep.append(1))
    try:
        fast = run_eval(embedded, heldout_run.prompts, seeds=[0], steps=20, guidance=embedded.default_guidance,
                        fast=True)
    finally:
        hook.remove()
    assert len(deep) == 7 * (1 + 16)  # a warm-up image, then the 16
    base, quick = heldout_run.report, fast.report
    all_right = [sum(r.ok for r in rep.results) for rep in (base, quick)]
    failures = "\n".join(f"{p!r}: {r.summary()}" for p, r in zip(fast.prompts, quick.results) if not r.ok)
    assert all_right[1] >= all_right[0] - 1, f"all right: {all_right[0]} at full work, {all_right[1]} fast\n{failures}"


def test_app_starts_offline_on_the_embedded_model(monkeypatch, tmp_path):
    """No model argument and no network: the app builds, and its first generation uses the embedded model."""
    import socket

    def no_network(self, address, *args, **kwargs):
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.delenv("SD_DEMO_MODEL", raising=False)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    import app
    from sd_demo.generate import GenerationParams

    args = app.parse_args(["--outputs", str(tmp_path)])
    assert args.model == "embedded"
    demo = app.build_demo(args)
    engine = demo.engine
    assert engine.cache.current is not None and engine.cache.current.ref.source == "embedded"
    result, paths = engine.generate(GenerationParams(prompt="a red circle on a blue background", steps=20, seed=0))
    assert engine.cache.current.ref.source == "embedded" and engine.cache.current.folder == models.EMBEDDED_DIR
    assert result.images[0].size == (128, 128) and paths and paths[0].exists()
    # the CFG scale the model card recommends (the scale its held-out table was measured at), not A1111's 7
    assert result.infotexts[0].params["CFG scale"] == hub.recommended_guidance(models.EMBEDDED_DIR)
    from sd_demo.shapes import evaluate

    assert evaluate("a red circle on a blue background", result.images[0]).matches["background"]


def test_the_card_examples_are_drawn_as_asked():
    """The Generate tab offers the card's example prompts to a new visitor (Hub widget): each one is drawn right, at
    the card's defaults, by the project's evaluator (two seeds each; every attribute the prompt names)."""
    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams
    from sd_demo.shapes.evaluate import evaluate

    engine = Engine(EngineSettings(model="embedded"))
    examples = engine.defaults("embedded").examples
    assert len(examples) >= 4
    wrong = []
    for prompt in examples:
        result, _ = engine.generate(GenerationParams(prompt=prompt, seed=11, batch_size=2), save=False)
        wrong += [f"{prompt}: {r.summary()}" for r in (evaluate(prompt, im) for im in result.images) if not r.ok]
    assert len(wrong) <= 1, wrong
