"""Model resolution and loading: Hub ids through the HF cache, local folders, pickle refusal, attention, cache."""
import gc
import re
import shutil
import weakref

import pytest
import torch

from sd_demo import hub, models, openvino_blocks
from sd_demo.models import PipelineCache, load_model, parse_model_ref, select_attention
from tests.tiny_models import fill_hf_cache, make_pickle_only


def test_parse_model_ref(tmp_path):
    assert parse_model_ref("embedded").source == "embedded"
    assert parse_model_ref("org/name") == models.ModelRef("hub", "org/name", None)
    assert parse_model_ref("org/name@v1.0").revision == "v1.0"
    assert parse_model_ref(str(tmp_path)).source == "local"
    for bad in ["", "not a repo", "./missing/folder", "/no/such/dir"]:
        with pytest.raises(ValueError, match="model"):
            parse_model_ref(bad)


@pytest.mark.parametrize("kind,family,pipe_cls,pred", [
    ("sd15", "sd1", "StableDiffusionPipeline", "epsilon"),
    ("sd2v", "sd2", "StableDiffusionPipeline", "v_prediction"),
    ("sdxl", "sdxl", "StableDiffusionXLPipeline", "epsilon"),
])
def test_load_from_hub_cache(use_hf_cache, kind, family, pipe_cls, pred):
    m = load_model(f"tiny/{kind}")
    assert m.ref.source == "hub" and m.family == family and type(m.pipe).__name__ == pipe_cls
    assert m.prediction_type == pred
    assert str(use_hf_cache) in str(m.folder)  # loaded from the cache snapshot, not from the build folder
    assert (m.device, m.dtype, m.attention) == ("cpu", torch.float32, "sdpa")
    assert m.default_size == 64


def test_unknown_hub_model_is_a_clear_error(use_hf_cache):
    with pytest.raises(ValueError, match="unknown model 'nobody/nothing'.*offline"):
        load_model("nobody/nothing")
    with pytest.raises(ValueError, match="tiny/sd15@v9"):
        load_model("tiny/sd15@v9")


def test_pickle_only_repo_is_refused(tmp_path, tiny_model_dirs, monkeypatch):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    make_pickle_only(folder)
    cache = tmp_path / "cache"
    fill_hf_cache(cache, "someone/pickled", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for spec in ["someone/pickled", str(folder)]:
        with pytest.raises(ValueError, match=r"has no safetensors weights.*--allow-pickle") as err:
            load_model(spec)
        assert "pickled" in str(err.value)  # the message names the repo
    assert load_model(str(folder), allow_pickle=True).family == "sd1"  # explicit opt-in works


def test_download_plan_prefers_fp16_variant_and_skips_extras():
    files = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned.ckpt", "scheduler/scheduler_config.json",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "safety_checker/model.safetensors"]
    for comp, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")]:
        files += [f"{comp}/config.json", f"{comp}/{name}.safetensors", f"{comp}/{name}.fp16.safetensors",
                  f"{comp}/{name}.bin", f"{comp}/{name}.non_ema.safetensors"]
    fp16 = hub.plan_download(files, "r", want_fp16=True, allow_pickle=False)
    assert fp16.variant == "fp16" and not fp16.pickle
    weights = [f for f in fp16.files if f.endswith(".safetensors")]
    assert sorted(weights) == sorted(["unet/diffusion_pytorch_model.fp16.safetensors",
                                      "vae/diffusion_pytorch_model.fp16.safetensors",
                                      "text_encoder/model.fp16.safetensors"])
    fp32 = hub.plan_download(files, "r", want_fp16=False, allow_pickle=False)
    assert fp32.variant is None and "unet/diffusion_pytorch_model.safetensors" in fp32.files
    assert not any(f.endswith((".bin", ".ckpt")) or f.startswith("safety_checker") for f in fp32.files + fp16.files)


def test_attention_selection(monkeypatch):
    assert select_attention("auto", "cpu")[0] == "sdpa"
    with pytest.raises(ValueError, match="xformers needs a CUDA GPU.*--attention sdpa"):
        select_attention("xformers", "cpu")

    def no_kernels():
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    monkeypatch.setattr(models, "_xformers_probe", no_kernels)
    backend, reason = select_attention("auto", "cuda")  # xformers imports but its probe fails: clean fallback
    assert backend == "sdpa" and "xformers unavailable: NotImplementedError" in reason
    with pytest.raises(ValueError, match="xformers is not usable here"):
        select_attention("xformers", "cuda")
    monkeypatch.setattr(models, "_xformers_probe", lambda: None)
    assert select_attention("auto", "cuda")[0] == "xformers"


def test_sdpa_processors_installed(loaded_models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = loaded_models["sd15"].pipe.unet.attn_processors.values()
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)


def test_dtype_rules():
    assert models.pick_dtype("cuda") == torch.float16
    assert models.pick_dtype("cuda", "bf16") == torch.bfloat16
    assert models.pick_dtype("mps") == torch.float16
    assert models.pick_dtype("cpu") == torch.float32
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        models.pick_dtype("cpu", "fp16")


def test_embedded_or_clear_error():
    if (models.EMBEDDED_DIR / "model_index.json").exists():
        pytest.skip("embedded model is built")
    with pytest.raises(ValueError, match="embedded model is not built yet"):
        load_model("embedded")


def test_cache_reuses_and_frees_on_switch(tiny_model_dirs):
    cache = PipelineCache()
    first = cache.get(str(tiny_model_dirs["sd15"]))
    assert cache.get(str(tiny_model_dirs["sd15"])) is first
    ref = weakref.ref(first.pipe.unet)
    del first
    second = cache.get(str(tiny_model_dirs["sd2v"]))
    gc.collect()
    assert ref() is None, "switching models must free the old pipeline"
    assert cache.current is second
    cache.release()
    assert cache.current is None


CARD = "---\nlicense: mit\ninference:\n  parameters:\n    guidance_scale: {}\n---\n# A model\n"


@pytest.mark.parametrize("card, expected", [(CARD.format(3.5), 3.5), (CARD.format(0), 0.0),
                                            (CARD.format("lots"), 7.0), (CARD.format(99), 7.0),
                                            ("---\ninference: true\n---\n", 7.0), ("no front matter", 7.0),
                                            (None, 7.0)])
def test_model_card_recommends_the_default_cfg_scale(tiny_model_dirs, tmp_path, card, expected):
    """The Hub's widget settings (README front matter inference.parameters.guidance_scale) set the CFG scale a
    request gets when it names none; 0 is honoured (distilled models), unusable values fall back to A1111's 7."""
    import shutil

    from sd_demo.generate import GenerationParams, generate
    from sd_demo.infotext import format_infotext

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    (folder / "README.md").unlink(missing_ok=True)
    if card is not None:
        (folder / "README.md").write_text(card)
    model = load_model(str(folder))
    assert model.default_guidance == expected
    run = generate(model, GenerationParams(prompt="a red circle", steps=2, seed=1))
    assert f"CFG scale: {expected:g}," in format_infotext(run.infotexts[0])
    if expected != 7.0:  # a request that names a CFG scale gets it, and it changes the image
        named = generate(model, GenerationParams(prompt="a red circle", steps=2, seed=1, guidance_scale=7.0))
        assert "CFG scale: 7," in format_infotext(named.infotexts[0])
        assert named.images[0].tobytes() != run.images[0].tobytes()


@pytest.mark.parametrize("value, expected", [(4, 4), ("2", 2), (0, 20), (2.5, 20), ("many", 20), (None, 20)])
def test_model_card_recommends_the_default_steps(tiny_model_dirs, tmp_path, value, expected):
    """A distilled model's card says how few steps it needs (inference.parameters.num_inference_steps): a request
    that names none gets that many (unusable values: A1111's 20); a named count wins."""
    import shutil

    from sd_demo.generate import GenerationParams, generate

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    params = "" if value is None else f"inference:\n  parameters:\n    num_inference_steps: {value}\n"
    (folder / "README.md").write_text(f"---\nlicense: mit\n{params}---\n# A model\n")
    model = load_model(str(folder))
    assert model.default_steps == expected
    seen = []
    run = generate(model, GenerationParams(prompt="a red circle", seed=1), on_step=seen.append)
    assert run.infotexts[0].params["Steps"] == expected and len(seen) == expected
    named = generate(model, GenerationParams(prompt="a red circle", seed=1, steps=3))
    assert named.infotexts[0].params["Steps"] == 3


@pytest.mark.parametrize("text, shown", [
    ("loaded /tmp/x/tiny_models0/sd15 (sd1) on cpu", "loaded sd15 (sd1) on cpu"),
    ("out /srv/runs/2026-lora/ done", "out 2026-lora done"),
    ("skipped '/data/in/img.png': bad", "skipped 'img.png': bad"),
    ("see http://127.0.0.1:7860/x and a/b, 1/2", "see http://127.0.0.1:7860/x and a/b, 1/2"),
])
def test_public_text_hides_the_paths_of_this_machine(text, shown):
    from sd_demo.models import public_text

    assert public_text(text) == shown


def test_download_plan_brings_the_model_card():
    files = ["model_index.json", "README.md", "docs/README.md", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors"]
    plan = hub.plan_download(files, "r", want_fp16=False, allow_pickle=False)
    assert "README.md" in plan.files and "docs/README.md" not in plan.files


def test_embedded_model_card_carries_its_recommended_cfg_and_sampler(tmp_path):
    from sd_demo.shapes.eval_model import model_card

    (tmp_path / "README.md").write_text(model_card(4.5, 20, [], "Euler a"))
    assert hub.recommended_guidance(tmp_path) == 4.5 and hub.recommended_sampler(tmp_path) == "Euler a"


@pytest.mark.parametrize("front, expected", [("sd_demo:\n  sampler: Euler a\n", "Euler a"),
                                             ("sd_demo:\n  sampler: Magic\n", "DPM++ 2M"),
                                             ("sd_demo: 3\n", "DPM++ 2M"), ("license: mit\n", "DPM++ 2M")])
def test_model_card_recommends_the_default_sampler(tiny_model_dirs, tmp_path, front, expected):
    """A request that names no sampler gets the card's (unknown names fall back); a named one wins."""
    import shutil

    from sd_demo.generate import GenerationParams, generate
    from sd_demo.infotext import format_infotext

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["sd15"], folder)
    (folder / "README.md").write_text(f"---\n{front}---\n# A model\n")
    model = load_model(str(folder))
    assert model.default_sampler == expected
    run = generate(model, GenerationParams(prompt="a red circle", steps=2, seed=1))
    assert f"Sampler: {expected}," in format_infotext(run.infotexts[0])
    named = generate(model, GenerationParams(prompt="a red circle", steps=2, seed=1, sampler="DDIM"))
    assert "Sampler: DDIM," in format_infotext(named.infotexts[0])


def _damaged_copy(src, dest, damage: str):
    """A copy of a tiny model folder with one thing broken, as a careless copy or a cut download leaves it."""
    shutil.copytree(src, dest)
    if damage == "truncated text encoder":
        weights = dest / "text_encoder" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no unet config":
        (dest / "unet" / "config.json").unlink()
    elif damage == "malformed index":
        (dest / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    return dest


def test_a_folder_is_checked_before_it_is_listed(tmp_path, monkeypatch):
    """'--model /' or '~' once walked the whole tree (28 s for ~, a PermissionError for /) before finding that it
    holds no model_index.json; now it is refused at once, and a model folder is never walked either."""
    import pathlib

    def walk(self, pattern):
        raise AssertionError(f"walked {self}")

    (tmp_path / "photos" / "2024" / "summer").mkdir(parents=True)
    monkeypatch.setattr(pathlib.Path, "rglob", walk)
    for spec in ["/", "~", str(tmp_path)]:
        with pytest.raises(ValueError, match=r"is not a diffusers model folder \(it has no model_index.json\)"):
            load_model(spec)


@pytest.mark.parametrize("damage,needle", [
    ("truncated text encoder", r"text_encoder could not be loaded \(Error while deserializing header"),
    ("no unet config", r"unet/config.json is missing in"),
    ("malformed index", r"model_index.json is not readable JSON \(Expecting"),
])
def test_a_damaged_model_folder_is_one_line_naming_what(tiny_model_dirs, tmp_path, damage, needle):
    folder = _damaged_copy(tiny_model_dirs["sd15"], tmp_path / "m", damage)
    with pytest.raises(ValueError, match=needle) as err:
        load_model(str(folder))
    assert len(str(err.value).splitlines()) == 1


def test_a_failed_load_keeps_the_working_model(tiny_model_dirs, tmp_path, monkeypatch):
    """A bad id costs its caller an error, not the next visitor a reload: a wrong name, folder or config fails before
    the loaded model is released, and damaged weights (found only while loading) bring the old model back."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cache = PipelineCache()
    good = cache.get(str(tiny_model_dirs["sd15"]))
    (tmp_path / "not-a-model" / "sub").mkdir(parents=True)
    broken = _damaged_copy(tiny_model_dirs["sd2v"], tmp_path / "no-config", "no unet config")
    for spec in [str(tmp_path / "not-a-model"), "nobody/nothing", str(broken), "x" * 5000]:
        with pytest.raises(ValueError):
            cache.get(spec)
        assert cache.current is good, spec
    damaged = _damaged_copy(tiny_model_dirs["sd2v"], tmp_path / "damaged", "truncated text encoder")
    with pytest.raises(ValueError, match="text_encoder could not be loaded"):
        cache.get(str(damaged))
    assert cache.current is not None and cache.current.ref == good.ref  # reloaded: the next request is served
    assert cache.get(str(tiny_model_dirs["sd15"])) is cache.current


def test_overlong_model_ids_are_refused_in_one_short_line():
    with pytest.raises(ValueError, match="model: 5000 characters is too long"):
        parse_model_ref("a" * 5000)
    with pytest.raises(ValueError, match="unknown model") as err:  # over the Hub's 96 characters a part
        parse_model_ref("org/" + "a" * 300)
    assert len(str(err.value)) < 400


def test_a_lora_that_is_not_one_is_refused(loaded_models, tiny_model_dirs, tmp_path):
    """A non-LoRA file gave a raw SafetensorError; a folder with no LoRA was accepted and the infotext claimed it."""
    model = loaded_models["sd15"]
    junk = tmp_path / "notes.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases = [(junk, "not a readable .safetensors file"), (tiny_model_dirs["sd15"] / "model_index.json",
                                                          "not a readable .safetensors file"),
             (empty, "the folder holds neither pytorch_lora_weights.safetensors nor a textual-inversion embedding")]
    for source, needle in cases:
        # named, not pathed (a public app's run names stand for folders of the server)
        with pytest.raises(ValueError, match=re.escape(f"lora: '{source.name}' could not be loaded: {needle}")):
            model.set_loras([(str(source), 1.0)])
        assert model.loras == ()


# torch: inductor compiles the tiny UNet and VAE decoder three times, about a minute on 2 cores; OpenVINO converts
# the UNet's blocks twice in seconds
@pytest.mark.parametrize("compiler", [pytest.param("torch", marks=pytest.mark.slow), "openvino"])
def test_a_compiled_pipeline_draws_the_same_pixels_and_follows_a_lora(tiny_model_dirs, tmp_path, compiler):
    """--compile torch / openvino: the same image as without it (within 1/255), with Fast's feature cache too (the
    compiled blocks still skip between full steps); a LoRA applied after the compile changes the image as it does
    uncompiled (the frozen graph held the old weights until it compiled again)."""
    import numpy as np

    from sd_demo.generate import GenerationParams, generate
    from tests.tiny_models import build_tiny_lora

    source = str(tiny_model_dirs["sd15"])
    build_tiny_lora(source, tmp_path / "lora")
    plain, compiled = load_model(source), load_model(source, compile=compiler)
    assert compiled.compiled == compiler and not plain.compiled

    def pixels(model, **kw):
        params = GenerationParams(prompt="a red circle", steps=4, seed=1, guidance_scale=7.0, **kw)
        return np.asarray(generate(model, params).images[0], dtype=np.int16)

    for kw in ({}, {"deep_cache": 3, "cfg_cutoff": 0.6}):  # exact, and Fast's feature cache (fp32: no autocast)
        assert np.abs(pixels(plain, **kw) - pixels(compiled, **kw)).max() <= 1, kw
    if compiler == "openvino":  # OpenVINO ran the blocks: the first on all 2 x 4 steps, a deep one on the exact
        first, deep, *_ = openvino_blocks.blocks(compiled.pipe.unet)  # run's 4 and Fast's 2 full steps (1st, 4th)
        assert (openvino_blocks.runs(first), openvino_blocks.runs(deep)) == (8, 6)
        decoder = openvino_blocks.blocks(compiled.pipe.vae.decoder)[0]
        assert openvino_blocks.runs(decoder) == 2  # one decode an image
        # converted once, at the first size and batch: another size, not square, at batch 2 runs the same graphs
        other = dict(width=compiled.default_size * 3 // 2, height=compiled.default_size, batch_size=2)
        assert np.abs(pixels(plain, **other) - pixels(compiled, **other)).max() <= 1
        assert openvino_blocks.runs(first) == 12 and openvino_blocks.conversions(first) == 1
        # off the grid of the UNet's down-sampling the up blocks take a target size: one more graph, for every such
        # size (two here)
        up = openvino_blocks.blocks(compiled.pipe.unet)[-2]
        ran = openvino_blocks.runs(up)
        for odd in (dict(width=compiled.default_size + 8), dict(height=compiled.default_size + 24)):
            assert np.abs(pixels(plain, **odd) - pixels(compiled, **odd)).max() <= 1, odd
        assert openvino_blocks.runs(up) == ran + 8 and openvino_blocks.conversions(up) == 2
        assert openvino_blocks.runs(first) == 20 and openvino_blocks.conversions(deep) == 1
        import sys  # OpenVINO's converter phones home unless its telemetry package is kept out

        assert sys.modules.get("openvino_telemetry") is None
    before = pixels(compiled)
    for model in (plain, compiled):
        model.set_loras([(str(tmp_path / "lora"), 1.0)])
    with_lora = pixels(compiled)
    assert np.abs(with_lora - before).mean() > 1 and np.abs(with_lora - pixels(plain)).max() <= 1
    if compiler == "openvino":  # in OpenVINO, converted again with the LoRA's weights
        assert openvino_blocks.runs(first) == 20 + 2 * 4


def test_compile_openvino_says_what_to_change_where_it_cannot_run(tiny_model_dirs, monkeypatch):
    """One line naming the fix: a bf16 model (OpenVINO runs float32 here), a GPU, OpenVINO not installed; and an
    unknown compiler."""
    source = str(tiny_model_dirs["sd15"])
    with pytest.raises(ValueError, match=r"^--compile openvino: runs float32 models; use --dtype fp32"):
        load_model(source, dtype="bf16", compile="openvino")
    with pytest.raises(ValueError, match=r"^--compile openvino: runs on the CPU, not cuda; add --device cpu"):
        openvino_blocks.check_available("cuda", torch.float32)
    with monkeypatch.context() as patched:
        patched.setattr(openvino_blocks.importlib.util, "find_spec", lambda name: None)
        with pytest.raises(ValueError, match=r"^--compile openvino: OpenVINO is not installed; run `pip install -r "
                                             r"requirements-openvino\.txt`"):
            load_model(source, compile="openvino")
    with pytest.raises(ValueError, match=r"^compile: 'tvm' is not one of torch, openvino$"):
        load_model(source, compile="tvm")
    import app  # the flag: bare for torch (as before OpenVINO came), or by name

    assert [app.parse_args(flags).compile for flags in ([], ["--compile"], ["--compile", "openvino"])] == \
        ["", "torch", "openvino"]
