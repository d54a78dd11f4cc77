"""Generation on tiny random pipelines: shapes, seeds, batches, negative prompts, samplers, validation, Stop."""
import threading
import types

import numpy as np
import pytest
import torch

from sd_demo.generate import GenerationParams, generate, params_from_infotext
from sd_demo.infotext import format_infotext, parse_infotext
from sd_demo.sampling.registry import SAMPLERS, make_scheduler

KINDS = ["sd15", "sd2v", "sdxl"]


def run(model, **kw):
    kw.setdefault("prompt", "a red circle on a blue background")
    kw.setdefault("steps", 2)
    kw.setdefault("seed", 42)
    return generate(model, GenerationParams(**kw))


def px(image):
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_and_seed_determinism(loaded_models, kind):
    m = loaded_models[kind]
    a, b, c = run(m), run(m), run(m, seed=43)
    assert a.images[0].size == (64, 64) and a.images[0].mode == "RGB"
    assert np.array_equal(px(a.images[0]), px(b.images[0])), "same seed must give the same image"
    assert np.abs(px(a.images[0]) - px(c.images[0])).max() > 10, "different seeds must give different images"


@pytest.mark.parametrize("kind", KINDS)
def test_non_square_size(loaded_models, kind):
    assert run(loaded_models[kind], width=96, height=64).images[0].size == (96, 64)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_batch_image_i_uses_seed_plus_i(loaded_models, kind):
    m = loaded_models[kind]
    batch = run(m, seed=7, batch_size=3)
    assert batch.seeds == [7, 8, 9] and len(batch.images) == 3
    assert [i.params["Seed"] for i in batch.infotexts] == [7, 8, 9]
    for i, seed in enumerate(batch.seeds):
        single = run(m, seed=seed).images[0]
        # Batched convolutions may round differently in the last bit; a different seed differs by far more.
        assert np.abs(px(batch.images[i]) - px(single)).max() <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_negative_prompt_changes_image(loaded_models, kind):
    m = loaded_models[kind]
    plain, negative = run(m), run(m, negative_prompt="blurry ugly")
    assert np.abs(px(plain.images[0]) - px(negative.images[0])).max() > 0
    assert negative.infotexts[0].negative_prompt == "blurry ugly"


def test_random_seed_is_resolved_and_reported(loaded_models):
    r = run(loaded_models["sd15"], seed=-1)
    assert 0 <= r.seeds[0] < 2**32 and r.infotexts[0].params["Seed"] == r.seeds[0]
    again = run(loaded_models["sd15"], seed=r.seeds[0])
    assert np.array_equal(px(r.images[0]), px(again.images[0])), "the reported seed reproduces the image"


def test_infotext_describes_the_run(loaded_models):
    r = run(loaded_models["sd15"], steps=3, guidance_scale=5.5, sampler="Euler a", width=72, clip_skip=2)
    text = format_infotext(r.infotexts[0])
    assert text.startswith("a red circle on a blue background\nSteps: 3, Sampler: Euler a, ")
    assert "CFG scale: 5.5, Seed: 42, Size: 72x64" in text and "Clip skip: 2" in text
    back, ignored = params_from_infotext(parse_infotext(text))
    assert (back.steps, back.sampler, back.guidance_scale, back.width, back.clip_skip) == (3, "Euler a", 5.5, 72, 2)
    assert ignored == []


def test_old_a1111_sampler_names_are_understood():
    info = parse_infotext("cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x768")
    params, ignored = params_from_infotext(info)
    assert (params.sampler, params.schedule, params.width, params.height) == ("DPM++ 2M", "Karras", 512, 768)
    assert ignored == []


def test_clip_skip_changes_conditioning(loaded_models):
    m = loaded_models["sd15"]
    assert np.abs(px(run(m).images[0]) - px(run(m, clip_skip=2).images[0])).max() > 0


@pytest.mark.parametrize("kind", ["sd15", "sd2v"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs(loaded_models, kind, sampler):
    r = run(loaded_models[kind], sampler=sampler, steps=3)
    arr = px(r.images[0])
    assert arr.shape == (64, 64, 3) and arr.std() > 0
    assert r.infotexts[0].params["Sampler"] == sampler


def test_sampler_keeps_model_prediction_type(loaded_models):
    base = loaded_models["sd2v"].base_scheduler_config
    for name in SAMPLERS:
        sched = make_scheduler(name, "Automatic", base)
        assert sched.config.get("prediction_type", "v_prediction") == "v_prediction", name


def test_schedule_types(loaded_models):
    base = loaded_models["sd15"].base_scheduler_config
    assert make_scheduler("DPM++ 2M", "Automatic", base).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", "Uniform", base).config.use_karras_sigmas is False
    assert make_scheduler("Euler", "Exponential", base).config.use_exponential_sigmas is True
    assert make_scheduler("DDIM", "SGM Uniform", base).config.timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="'Karras' is not available for sampler 'DDIM'"):
        make_scheduler("DDIM", "Karras", base)


@pytest.mark.parametrize("field,value,match", [
    ("width", 100, "width: 100 px"), ("height", 0, "height: 0 px"), ("width", 2056, "width: 2056"),
    ("steps", 0, "steps: 0"), ("steps", 151, "steps: 151"), ("guidance_scale", -1, "guidance_scale: -1"),
    ("batch_size", 9, "batch_size: 9"), ("batch_size", 0, "batch_size: 0"), ("sampler", "Foo", "sampler: unknown"),
    ("schedule", "Bar", "schedule: unknown"), ("seed", -5, "seed: -5"), ("clip_skip", 0, "clip_skip: 0"),
])
def test_bad_input_names_the_field(loaded_models, field, value, match):
    with pytest.raises(ValueError, match=match):
        run(loaded_models["sd15"], **{field: value})


def test_progress_previews_and_stop(loaded_models):
    m = loaded_models["sd15"]
    events, cancel = [], threading.Event()

    def on_step(ev):
        events.append(ev)
        if ev.step == 3:
            cancel.set()

    r = generate(m, GenerationParams(prompt="x", steps=10, seed=1), on_step=on_step, cancel=cancel, preview_every=2)
    assert r.interrupted_at == 3 and len(r.images) == 1
    assert [e.step for e in events][:3] == [1, 2, 3] and events[0].total == 10
    preview = next(e.previews for e in events if e.previews)
    assert preview[0].size == (32, 32)  # 8x8 latents, shown 4x


@pytest.mark.parametrize("sampler", ["Euler a", "DDIM", "DPM++ 2M SDE", "DPM++ 2S a", "DDPM (ours)"])
def test_watching_the_previews_changes_no_pixel(loaded_models, sampler):
    """The live preview reads each step's denoised estimate through a wrapper on the sampler's step: the same seed
    gives the same image with and without it (the pipeline reads step's signature to pass the generator that
    stochastic samplers draw their noise from; without it they drew from the global RNG)."""
    m = loaded_models["sd15"]
    p = GenerationParams(prompt="x", steps=6, seed=3, sampler=sampler)
    watched = generate(m, p, on_step=lambda ev: None, preview_every=2).images[0]
    torch.manual_seed(1234)  # the global RNG elsewhere: a sampler drawing from it would differ
    assert np.array_equal(np.asarray(watched), np.asarray(generate(m, p).images[0]))


class LinearVAE(torch.nn.Module):
    """A VAE stand-in whose encoder is exactly linear per pixel (z = A·rgb + c, 8x downsampled)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(4, 3, generator=g))
        self.c = torch.nn.Parameter(torch.randn(4, generator=g))
        self.config = types.SimpleNamespace(scaling_factor=0.5)

    def encode(self, x):  # x: (B, 3, H, W) in [-1, 1]
        rgb = (x[:, :, ::8, ::8] + 1) / 2
        mean = torch.einsum("ck,bkhw->bchw", self.a, rgb) + self.c[None, :, None, None]
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean))


@torch.no_grad()
def test_preview_map_inverts_a_linear_vae():
    from sd_demo.preview import fit_preview_map, latents_to_preview

    vae = LinearVAE()
    wb = fit_preview_map(vae)
    colour = torch.tensor([0.2, 0.6, 0.9])
    lat = vae.encode((colour * 2 - 1).view(1, 3, 1, 1).expand(1, 3, 16, 16)).latent_dist.mean * 0.5
    shown = np.asarray(latents_to_preview(lat, wb)[0], dtype=float).mean(axis=(0, 1))
    assert np.abs(shown - colour.numpy() * 255).max() <= 1.0


@torch.no_grad()
def test_preview_map_explains_real_vae_colours(loaded_models):
    """On a real (random tiny) VAE the fitted map must explain a good part of the colour variance."""
    from sd_demo.preview import _COLOURS, fit_preview_map

    vae = loaded_models["sd15"].pipe.vae
    w, b = fit_preview_map(vae)
    rgb = torch.tensor(_COLOURS)
    z = vae.encode((rgb * 2 - 1)[:, :, None, None].expand(-1, -1, 64, 64)).latent_dist.mean
    pred = (z * vae.config.scaling_factor).mean(dim=(2, 3)).numpy() @ w + b
    r2 = 1 - ((pred - rgb.numpy()) ** 2).sum() / ((rgb.numpy() - rgb.numpy().mean(0)) ** 2).sum()
    assert r2 > 0.3


@pytest.mark.parametrize("kind", KINDS)
def test_compel_path_equals_pipeline_encoding_for_plain_prompts(loaded_models, kind):
    """Our weighted/long-prompt encoder, given an unweighted prompt, must reproduce the pipeline's own encoding."""
    from sd_demo.prompts import PromptEncoder, parse_attention

    m = loaded_models[kind]
    sdxl = kind == "sdxl"
    kw = PromptEncoder(m.pipe, 1, sdxl).pipeline_kwargs(parse_attention("a red circle"), parse_attention("blurry"), False)
    theirs = m.pipe.encode_prompt("a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt="blurry", **({"prompt_2": None} if sdxl else {}))
    assert torch.allclose(kw["prompt_embeds"], theirs[0], atol=1e-6)
    assert torch.allclose(kw["negative_prompt_embeds"], theirs[1], atol=1e-6)
    if sdxl:
        assert torch.allclose(kw["pooled_prompt_embeds"], theirs[2], atol=1e-6)


def test_clip_skip_uses_an_earlier_layer(loaded_models):
    from sd_demo.prompts import PromptEncoder, parse_attention

    pipe, prompt = loaded_models["sd15"].pipe, parse_attention("a red circle")
    last = PromptEncoder(pipe, 1).embeds(prompt)
    skipped = PromptEncoder(pipe, 2).embeds(prompt)
    with torch.no_grad():
        hidden = pipe.text_encoder(pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids,
                                   output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(skipped, pipe.text_encoder.final_layer_norm(hidden), atol=1e-6)
    assert not torch.allclose(skipped, last)


def test_vae_nan_guard_retries_in_fp32(tiny_model_dirs):
    """A half-precision VAE that overflows (NaN) is upcast to fp32 and the image decoded again, not returned black."""
    from sd_demo.models import load_model

    m = load_model(str(tiny_model_dirs["sd15"]), dtype="bf16")  # bf16 runs on CPU; fp16 is what CUDA uses
    vae, calls = m.pipe.vae, []
    real_decode = vae.decode

    def overflowing_decode(z, **kw):
        calls.append(vae.dtype)
        out = real_decode(z, **kw)
        return (out[0] * float("nan"),) if vae.dtype != torch.float32 else out

    vae.decode = overflowing_decode
    r = run(m, steps=2)
    assert calls == [torch.bfloat16, torch.float32] and vae.dtype == torch.float32
    assert px(r.images[0]).std() > 0  # a real image, not the black one NaN would give


@pytest.mark.parametrize("sampler", ["DDIM", "DDPM", "DDIM (ours)", "DDPM (ours)"])
def test_latent_samplers_do_not_clip_x0_to_the_pixel_range(sampler):
    """A model whose scheduler config never names clip_sample (an Euler or DPM++ config, like the embedded model's)
    must not get DDIM/DDPM's pixel-space default of clipping x0 to [-1, 1]: on the embedded model that turned
    DDIM's held-out background accuracy from 100 % into 23 %."""
    base = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2)
    assert make_scheduler(sampler, "Automatic", base).config.clip_sample is False
    assert make_scheduler(sampler, "Automatic", {**base, "clip_sample": True}).config.clip_sample is True


@pytest.mark.parametrize("field,value,match", [
    ("width", "abc", "width: 'abc' is not a number"), ("batch_size", None, "batch_size: missing"),
    ("width", 64.5, "width: 64.5 is not a whole number"), ("seed", 1.5, "seed: 1.5 is not a whole number"),
    ("guidance_scale", "lots", "guidance_scale: 'lots' is not a number"),
    ("guidance_scale", float("nan"), "guidance_scale: nan is not a number"),
    ("batch_size", True, "batch_size: True is not a number"),
    ("prompt", "a \ud800 cat", r"prompt: character 3 \('\\ud800'\) is not valid Unicode"),
    ("negative_prompt", "\udfff", "negative_prompt: character 1"),
    # str() of a 5000-digit int raised Python's ValueError; float() of a 400-digit one OverflowError
    pytest.param("steps", 10**5000, "steps: a 16610-bit number is out of range", id="steps-huge"),
    pytest.param("guidance_scale", 10**400, "guidance_scale: a 1329-bit number is out of range", id="cfg-huge"),
    ("sampler", "a\nb" * 40, r"sampler: unknown 'a\\nba\\nb.*…; choose"),  # one line, cut short
])
def test_raw_api_values_are_refused_naming_the_field(field, value, match):
    """Values as an API caller may send them: Python's own message ('invalid literal for int()') named no field,
    and a fraction was silently truncated (width 64.5 ran at 64)."""
    with pytest.raises(ValueError, match=match):
        GenerationParams(**{"prompt": "x", field: value}).validate()


def test_whole_numbers_in_any_spelling_are_taken():
    p = GenerationParams(prompt="x", width=64.0, height="72", seed="7", steps=3.0, guidance_scale="4.5").validate()
    assert (p.width, p.height, p.seed, p.steps, p.guidance_scale) == (64, 72, 7, 3, 4.5)
    assert all(type(v) is int for v in (p.width, p.height, p.seed, p.steps))


def test_a_huge_prompt_is_refused_at_once(loaded_models):
    """100 000 characters held the generation slot for about a minute; the cap is generous (A1111 sets none)."""
    import time

    from sd_demo.generate import MAX_PROMPT

    assert MAX_PROMPT >= 4000
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"prompt: 100000 characters is too long; at most {MAX_PROMPT}"):
        run(loaded_models["sd15"], prompt=("a red circle, " * 10000)[:100000])
    with pytest.raises(ValueError, match="negative_prompt: "):
        run(loaded_models["sd15"], negative_prompt="x" * (MAX_PROMPT + 1))
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("kind,deepest", [("sd15", 2), ("sdxl", 1)])  # 2-layer encoders; SDXL starts one back
def test_clip_skip_is_checked_against_the_text_encoder(loaded_models, kind, deepest):
    """Beyond the encoder's depth clip skip read embeddings or raised IndexError; now the message names the field and
    the model's range."""
    m = loaded_models[kind]
    assert m.max_clip_skip == deepest
    assert run(m, clip_skip=deepest).images[0].size == (64, 64)
    for beyond in (deepest + 1, 12):
        with pytest.raises(ValueError, match=f"clip_skip: {beyond} is out of range for this model.*use 1 to {deepest}"):
            run(m, clip_skip=beyond)


def test_all_torch_work_runs_on_one_device_thread(tiny_model_dirs, tmp_path, monkeypatch):
    """PyTorch's CPU ops run on an OpenMP team per calling thread, and a second live team halves the speed of both
    on a 2-core machine (issue 19: 0.83 -> 1.55 s an image). So loading and generating, called from any thread
    (the main one, gradio's handlers, a stream's consumer), run on the one device thread."""
    import threading

    from sd_demo import engine as engine_module
    from sd_demo import models

    seen = []

    def recorded(fn):
        def call(*args, **kwargs):
            seen.append((fn.__name__, threading.get_ident()))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(engine_module, "generate", recorded(engine_module.generate))
    monkeypatch.setattr(models, "load_planned", recorded(models.load_planned))
    engine = engine_module.Engine(engine_module.EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    params = GenerationParams(prompt="x", steps=2, seed=1)
    engine.load()
    engine.generate(params)
    elsewhere = threading.Thread(target=lambda: engine.generate(params))
    elsewhere.start()
    elsewhere.join()
    assert list(engine.run(params))[-1].result.images
    assert [name for name, _ in seen] == ["load_planned"] + ["generate"] * 3
    threads = {ident for _, ident in seen}
    assert len(threads) == 1 and not threads & {threading.get_ident(), elsewhere.ident}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cfg_cutoff_drops_the_negative_pass_for_the_last_steps(tiny_model_dirs, family):
    """The fast switch: after cfg_cutoff of the steps each step runs the UNet once (the prompt's half), not twice;
    the steps before are those of the full run (the same latents there), and the parameters record it."""
    from sd_demo.models import load_model

    model = load_model(str(tiny_model_dirs[family]))
    batches, seen = [], []
    hook = model.pipe.unet.register_forward_pre_hook(lambda mod, args, kw: batches.append(
        (kw.get("sample") if kw.get("sample") is not None else args[0]).shape[0]), with_kwargs=True)
    try:
        full = generate(model, GenerationParams(prompt="a red circle", steps=4, seed=1, guidance_scale=7.0))
        batches_full, batches[:] = list(batches), []
        cut = generate(model, GenerationParams(prompt="a red circle", steps=4, seed=1, guidance_scale=7.0,
                                               cfg_cutoff=0.5))
    finally:
        hook.remove()
    assert batches_full == [2, 2, 2, 2] and batches == [2, 2, 1, 1]
    assert cut.infotexts[0].params["CFG cutoff"] == 0.5 and "CFG cutoff" not in full.infotexts[0].params
    assert np.asarray(cut.images[0]).tobytes() != np.asarray(full.images[0]).tobytes()
    params, ignored = params_from_infotext(cut.infotexts[0])
    assert params.cfg_cutoff == 0.5 and not ignored
    with pytest.raises(ValueError, match="cfg_cutoff: 1.5 is out of range"):
        GenerationParams(prompt="x", cfg_cutoff=1.5).validate()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_deep_cache_runs_the_deep_blocks_every_nth_step_only(tiny_model_dirs, family):
    """DeepCache: with deep_cache 2 the deep blocks run on steps 1, 3, 5 of 6 and the shallow branch on every step;
    with CFG ending early too (cfg_cutoff) the kept features are cut to the prompt's half; the hooks are gone after
    the run (the next plain run equals one before), and the parameters record it."""
    from sd_demo.deepcache import deep_blocks
    from sd_demo.models import load_model

    model = load_model(str(tiny_model_dirs[family]))
    unet = model.pipe.unet
    calls = {"deep": 0, "shallow": 0}
    # counted inside the blocks: a block's own pre-hooks fire on a reused call too
    hooks = [unet.mid_block.resnets[0].register_forward_pre_hook(
                 lambda *a: calls.__setitem__("deep", calls["deep"] + 1)),
             unet.up_blocks[-1].resnets[0].register_forward_pre_hook(
                 lambda *a: calls.__setitem__("shallow", calls["shallow"] + 1))]
    assert unet.mid_block in deep_blocks(unet) and unet.up_blocks[-1] not in deep_blocks(unet)
    try:
        plain = run(model, steps=6, guidance_scale=7.0)
        assert calls == {"deep": 6, "shallow": 6}
        calls.update(deep=0, shallow=0)
        cached = run(model, steps=6, guidance_scale=7.0, deep_cache=2, cfg_cutoff=0.5)
        assert calls == {"deep": 3, "shallow": 6}
    finally:
        for h in hooks:
            h.remove()
    assert px(cached.images[0]).tobytes() != px(plain.images[0]).tobytes()
    assert px(run(model, steps=6, guidance_scale=7.0).images[0]).tobytes() == px(plain.images[0]).tobytes()
    assert cached.infotexts[0].params["Deep cache"] == 2 and "Deep cache" not in plain.infotexts[0].params
    params, ignored = params_from_infotext(cached.infotexts[0])
    assert params.deep_cache == 2 and params.cfg_cutoff == 0.5 and not ignored


def test_the_tiny_vae_comes_from_the_models_folder_or_the_hub_and_is_skipped_with_a_note(tiny_model_dirs, fake_hub,
                                                                                       tmp_path):
    """tiny_vae decodes with the model's own tiny_vae/ folder, else with TAESD downloaded from the Hub (the full VAE's
    decoder then never runs); where neither can be had the picture is decoded by the full VAE, as without the
    switch, and the run says why (a failed download is tried again a minute later). The parameters name the tiny
    VAE that ran."""
    import json
    import shutil

    from sd_demo.models import TINY_VAE_DIR, TINY_VAE_RETRY_S, load_model
    from tests.tiny_models import build_tiny_taesd

    own = tmp_path / "own"
    shutil.copytree(tiny_model_dirs["sd15"], own)
    build_tiny_taesd(own / TINY_VAE_DIR)
    model = load_model(str(own))
    full_decoder = []
    hook = model.pipe.vae.decoder.register_forward_pre_hook(lambda *a: full_decoder.append(1))
    plain = run(model, steps=3)
    assert len(full_decoder) == 1
    tiny = run(model, steps=3, tiny_vae=True)
    hook.remove()
    assert len(full_decoder) == 1 and not tiny.warnings
    assert tiny.infotexts[0].params["Tiny VAE"] == TINY_VAE_DIR and "Tiny VAE" not in plain.infotexts[0].params
    assert px(tiny.images[0]).tobytes() != px(plain.images[0]).tobytes()
    assert params_from_infotext(tiny.infotexts[0]) == (GenerationParams(**{
        **vars(params_from_infotext(plain.infotexts[0])[0]), "tiny_vae": True}), [])

    model = load_model(str(tiny_model_dirs["sd15"]))  # no folder of its own: TAESD, which the Hub lacks
    plain = run(model, steps=3)
    missing = run(model, steps=3, tiny_vae=True)
    assert missing.warnings == ["tiny VAE: madebyollin/taesd could not be loaded (unknown model 'madebyollin/taesd': "
                                "no such repo on the Hub (check the id, or log in if private)); decoded with the full "
                                "VAE"]
    assert px(missing.images[0]).tobytes() == px(plain.images[0]).tobytes()
    assert "Tiny VAE" not in missing.infotexts[0].params

    # a failed download is not tried again on every image, but a minute later
    fake_hub.add("madebyollin/taesd", build_tiny_taesd(tmp_path / "taesd"))
    assert run(model, steps=3, tiny_vae=True).warnings == missing.warnings
    model.tiny_vae_failed -= TINY_VAE_RETRY_S
    hub = run(model, steps=3, tiny_vae=True)
    assert hub.infotexts[0].params["Tiny VAE"] == "madebyollin/taesd" and not hub.warnings
    assert fake_hub.downloads("diffusion_pytorch_model.safetensors")
    assert px(hub.images[0]).tobytes() != px(plain.images[0]).tobytes()

    # a VAE of its own (the embedded model's kind): TAESD reads SD's latents only, so it is not even fetched
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dirs["sd15"], other)
    config = json.loads((other / "vae" / "config.json").read_text())
    (other / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.5}))
    fetched = len(fake_hub.requests)
    result = run(load_model(str(other)), steps=3, tiny_vae=True)
    assert result.warnings == ["tiny VAE: this model's VAE is not SD's (scaling factor 0.5), so madebyollin/taesd "
                               "would draw noise, and it has no tiny_vae/ folder of its own; decoded with the full VAE"]
    assert len(fake_hub.requests) == fetched


def test_fast_fills_in_the_switches_left_off(loaded_models):
    """The Fast choice: Deep cache 3 and CFG cutoff 0.6 where the request leaves them off; a switch set by hand
    wins, and the infotext records what ran (so sending the picture back reproduces it without Fast)."""
    from sd_demo.generate import FAST

    fast = run(loaded_models["sd15"], fast=True, steps=6)
    assert (fast.infotexts[0].params["Deep cache"], fast.infotexts[0].params["CFG cutoff"]) == (
        FAST["deep_cache"], FAST["cfg_cutoff"])
    mine = run(loaded_models["sd15"], fast=True, steps=6, deep_cache=5)
    assert mine.infotexts[0].params["Deep cache"] == 5 and mine.infotexts[0].params["CFG cutoff"] == 0.6
    assert "Autocast" not in fast.infotexts[0].params  # too small a UNet (AUTOCAST_MIN_PARAMS)
    params, _ = params_from_infotext(fast.infotexts[0])
    again = run(loaded_models["sd15"], steps=6, deep_cache=params.deep_cache, cfg_cutoff=params.cfg_cutoff,
                autocast=params.autocast)
    assert px(again.images[0]).tobytes() == px(fast.images[0]).tobytes()
    for value, match in ((0, "deep_cache: 0 is out of range; use 1 \\(off\\) to 10"), ("maybe", "fast: 'maybe'")):
        field = "deep_cache" if value == 0 else "fast"
        with pytest.raises(ValueError, match=match):
            GenerationParams(prompt="x", **{field: value}).validate()
    assert GenerationParams(prompt="x", fast="true").validate().fast is True


def test_autocast_runs_the_unet_and_decoder_in_bf16_and_says_why_not_where_it_cannot(loaded_models, monkeypatch):
    """The autocast switch: the UNet and the VAE's decoder compute in bf16 (the sampler's latents stay fp32), the
    image close to the exact one, in txt2img and img2img, and the hooks are gone after the run. Where it cannot
    run, the run goes on without it and says why. (bf16 is taken as native here: where the CPU emulates it, the
    switch is not offered, but the path is the same.)"""
    import torch
    from PIL import Image

    from sd_demo import models

    model = loaded_models["sd15"]
    monkeypatch.setattr(models, "native_bf16", lambda: True)
    assert model.autocast_reason == ""
    seen = {"unet": [], "decoder": []}
    hooks = [model.pipe.unet.conv_in.register_forward_hook(lambda m, i, o: seen["unet"].append(o.dtype)),
             model.pipe.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen["decoder"].append(o.dtype))]
    try:
        exact, ac = run(model, steps=4), run(model, steps=4, autocast=True)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"unet": [torch.float32] * 4 + [torch.bfloat16] * 4, "decoder": [torch.float32, torch.bfloat16]}
    assert ac.infotexts[0].params["Autocast"] == "bf16" and "Autocast" not in exact.infotexts[0].params
    diff = np.abs(px(ac.images[0]) - px(exact.images[0]))
    assert 0 < diff.mean() < 4, diff.mean()  # bf16's rounding, not another picture
    for module in (model.pipe.unet, model.pipe.vae.decoder):  # the run's hooks are gone: the next run is fp32
        assert models.AUTOCAST_HOOK not in module._diffusers_hook.hooks
    assert px(run(model, steps=4).images[0]).tobytes() == px(exact.images[0]).tobytes()
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    redrawn = generate(model, GenerationParams(prompt="a red square", steps=4, seed=1, autocast=True), init_image=src)
    plain = generate(model, GenerationParams(prompt="a red square", steps=4, seed=1), init_image=src)
    assert 0 < np.abs(px(redrawn.images[0]) - px(plain.images[0])).mean() < 4
    # where it cannot run: said, and the run goes on in fp32; Fast leaves it out
    monkeypatch.setattr(models, "native_bf16", lambda: False)
    refused = run(model, steps=4, autocast=True)
    assert refused.warnings == ["autocast: this CPU has no native bf16 (AVX-512 BF16 or AMX), where it is slower "
                                "than fp32; ran without it"]
    assert "Autocast" not in refused.infotexts[0].params
    assert px(refused.images[0]).tobytes() == px(exact.images[0]).tobytes()
    assert "Autocast" not in run(model, fast=True).infotexts[0].params
    monkeypatch.setattr(model, "dtype", torch.bfloat16)
    assert model.autocast_reason == "the model already runs in bf16"
