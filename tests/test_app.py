"""The web app end to end: launch on a free localhost port, drive it with gradio_client like a script user."""
import pytest
from gradio_client import Client, handle_file

from sd_demo.infotext import read_png


@pytest.fixture(scope="module")
def app_url(app_server):
    return app_server[0]


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_generate_endpoint_returns_png_with_infotext(client):
    gallery, preview, status, infotext = client.predict(
        prompt="a red circle", negative_prompt="blurry", steps=3, seed=5, batch_size=2, api_name="/generate"
    )
    assert len(gallery) == 2 and "seed 5" in status
    info = read_png(gallery[0]["image"])
    assert info.prompt == "a red circle" and info.negative_prompt == "blurry"
    assert info.params["Seed"] == 5 and info.params["Steps"] == 3
    assert read_png(gallery[1]["image"]).params["Seed"] == 6
    assert infotext.startswith("a red circle\nNegative prompt: blurry\nSteps: 3")


@pytest.mark.parametrize("kw,field", [
    ({"width": 100}, "width"), ({"height": 4096}, "height"), ({"steps": 0}, "steps"), ({"steps": 151}, "steps"),
    ({"guidance_scale": -1}, "guidance_scale"), ({"batch_size": 9}, "batch_size"), ({"sampler": "Nope"}, "sampler"),
    ({"model": "nobody/nothing"}, "model"),
])
def test_bad_input_is_a_clear_error_and_app_keeps_serving(client, kw, field, capfd):
    capfd.readouterr()
    with pytest.raises(Exception) as err:
        client.predict(prompt="x", steps=kw.pop("steps", 2), **kw, api_name="/generate")
    message = str(err.value)
    assert field in message and "Traceback" not in message
    assert "Traceback" not in capfd.readouterr().err  # the user's mistake is no failure of the server's
    gallery, *_ = client.predict(prompt="still alive", steps=2, seed=1, api_name="/generate")
    assert len(gallery) == 1


def test_png_info_endpoint_reads_parameters(client, tmp_path):
    gallery, *_ = client.predict(prompt="a blue star", steps=2, seed=9, api_name="/generate")
    text = client.predict(handle_file(gallery[0]["image"]), api_name="/png_info")
    assert text.startswith("a blue star\nSteps: 2") and "Seed: 9" in text


def test_fast_by_name_through_the_api(client):
    """The Fast choice by its API name (after the X/Y/Z inputs: the earlier positions stay); the parameters say what
    ran."""
    *_, infotext = client.predict(prompt="a blue star", steps=6, seed=9, fast=True, api_name="/generate")
    assert "Deep cache: 3" in infotext and "CFG cutoff: 0.6" in infotext


def test_api_lists_named_generate_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")
    params = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert params[:4] == ["prompt", "negative_prompt", "sampler", "schedule"] and "seed" in params and "model" in params


def test_stop_ends_only_this_sessions_run(client, app_server):
    """Stop (keyed by the caller's session) ends the run after the current step and returns the image so far."""
    import time

    job = client.submit(prompt="long", steps=150, width=512, height=512, seed=3, api_name="/generate")
    engine = app_server[1]
    deadline = time.time() + 60
    while not engine.cancel(client.session_hash):  # True once the job is running under this session's key
        assert time.time() < deadline, "job never started"
        time.sleep(0.05)
    gallery, _, status, infotext = job.result(timeout=120)
    assert len(gallery) == 1 and "stopped at step" in status
    stopped_at = int(status.split("stopped at step ")[1].split()[0])
    assert 1 <= stopped_at < 150
    assert not engine.cancel("someone-else")  # another session has nothing running to stop


def test_missing_lora_is_named(client):
    with pytest.raises(Exception) as err:
        client.predict(prompt="x", steps=1, loras="/no/such/lora", api_name="/generate")
    assert "lora: '/no/such/lora' not found" in str(err.value)


def test_loading_a_model_sets_its_native_size_and_recommended_cfg_sampler_and_steps():
    """The Load button moves the sliders to the new model's native size and its card's CFG scale, sampler and
    steps."""
    import types

    import gradio as gr

    from sd_demo.ui.generate import _load_model_fn

    from sd_demo.engine import Engine

    loaded = types.SimpleNamespace(describe=lambda: "**m** loaded", default_size=768, default_guidance=4.5,
                                   default_sampler="Euler a", max_clip_skip=3, examples=("a red circle",),
                                   default_steps=4)
    engine = types.SimpleNamespace(load=lambda name: loaded, cache=types.SimpleNamespace(current=None))
    engine.defaults = lambda name=None: Engine.defaults(engine, name)  # the engine's rule, over a stub model
    engine.chosen_model = lambda name, public: name
    status, width, height, cfg, sampler, steps, clip, examples, box, loaded_now = _load_model_fn(engine, False)(
        "m", 5, progress=lambda *a, **k: None)
    assert loaded_now == status  # what the img2img tab follows
    assert (status, width, height, cfg, sampler, steps) == ("**m** loaded", 768, 768, 4.5, "Euler a", 4)
    assert (clip["maximum"], clip["value"]) == (3, 3)  # the clip-skip slider ends at the model's depth
    assert examples["samples"] == [["a red circle"]]  # the card's example prompts

    # a model that fails to load: said on the status line, the box back to the loaded model, the rest unchanged
    def fails(name):
        raise ValueError(f"model: '{name}' was not found on the Hub")

    engine.cache.current, engine.load = loaded, fails
    engine.current_choice = lambda public: "m"
    status, *rest, box, loaded_now = _load_model_fn(engine, False)("someone/missing", 5, progress=lambda *a, **k: None)
    assert status == "⚠️ model: 'someone/missing' was not found on the Hub · back to m"
    assert all(isinstance(r, type(gr.skip())) for r in [*rest, loaded_now]) and len(rest) == 7
    assert box == "m"  # the model box back to the loaded model, so that Generate does not try the failed one


@pytest.mark.parametrize("flags,enabled", [([], True), (["--share"], False), (["--share", "--allow-training"], True),
                                           (["--share", "--auth", "ann:pw"], True)])
def test_training_is_off_on_a_public_app_unless_the_owner_turns_it_on(tiny_model_dirs, tmp_path, flags, enabled):
    import app

    args = app.parse_args(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path), *flags])
    demo = app.build_demo(args)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert ("train-btn" in ids) == enabled and ("train-disabled" in ids) == (not enabled)
    # where it is on, a public app takes only its own training results as LoRAs
    engine = demo.engine
    run = _finished_run(engine, "20260101-000000-x", None, str(tiny_model_dirs["sd15"]))
    unfinished = engine.jobs.root / "20260101-000001-y"
    unfinished.mkdir(parents=True)
    (unfinished / "job.json").write_text("{}")
    assert engine.is_training_result(str(run)) and not engine.is_training_result(str(tiny_model_dirs["sd15"]))
    assert not engine.is_training_result(str(unfinished))  # no adapter to load yet
    assert engine.lora_sources([(run.name, 1.0), (unfinished.name, 1.0)]) == [(str(run), 1.0), (unfinished.name, 1.0)]


def test_png_info_reads_huge_or_broken_uploads_with_a_message(client, tmp_path):
    """A 20000 px square PNG (a decompression bomb for PIL) with its text after the pixels is read without decoding
    them; a file that is no image says so in one line; another type is refused by name."""
    import struct

    from tests.test_infotext import EXAMPLE_TEXT, _chunk

    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    huge = tmp_path / "huge.png"  # its IDAT is junk: any decode would fail
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", b"junk")
                     + _chunk(b"tEXt", b"parameters\0" + EXAMPLE_TEXT.encode()) + _chunk(b"IEND", b""))
    assert client.predict(handle_file(str(huge)), api_name="/png_info") == EXAMPLE_TEXT
    (tmp_path / "fake.png").write_bytes(b"not an image")
    assert client.predict(handle_file(str(tmp_path / "fake.png")), api_name="/png_info") == \
        "This file could not be read as an image."
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(Exception, match="Invalid file type"):
        client.predict(handle_file(str(tmp_path / "notes.txt")), api_name="/png_info")


@pytest.mark.parametrize("flags,env,public", [
    ([], {}, False), (["--host", "127.0.0.1"], {}, False), (["--host", "127.8.9.10"], {}, False),
    (["--host", "::1"], {}, False), (["--host", "LOCALHOST"], {}, False),
    (["--host", "0.0.0.0"], {}, True), (["--host", "192.168.1.20"], {}, True), (["--host", "::"], {}, True),
    (["--host", "myhost.lan"], {}, True), ([], {"GRADIO_SERVER_NAME": "0.0.0.0"}, True),
    (["--host", "127.0.0.1"], {"GRADIO_SERVER_NAME": "0.0.0.0"}, False),  # the flag wins, as in gradio
    (["--host", "0.0.0.0", "--auth", "ann:pw"], {}, False), ([], {"GRADIO_SERVER_NAME": "10.0.0.2",
                                                                  "SD_DEMO_AUTH": "ann:pw"}, False),
    (["--share"], {}, True), ([], {"SPACE_ID": "me/app"}, True),
])
def test_a_bind_other_machines_reach_without_auth_is_public(monkeypatch, flags, env, public):
    import app

    for name in ("GRADIO_SERVER_NAME", "SD_DEMO_AUTH", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert app.is_public(app.parse_args(flags)) == public


def test_launch_warns_of_an_open_bind_and_sets_the_limits(monkeypatch, tmp_path, caplog):
    """Start-up says why the app is public and how to close it; gradio gets the bound host, the outputs folder
    (and only it) to serve, and the upload cap."""
    import app

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    calls = []
    from fastapi import FastAPI

    blocked = []
    stub = type("Demo", (), {"launch": lambda self, **kw: calls.append(kw),
                             "block_thread": lambda self: blocked.append(True),
                             "app": FastAPI(), "engine": None})()
    app.launch(stub, app.parse_args(["--host", "0.0.0.0", "--outputs", str(tmp_path / "out")]))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "listening on 0.0.0.0 without --auth" in warnings[0]
    assert "add --auth USER:PASS" in warnings[0] and "\n" not in warnings[0]
    assert calls[0]["server_name"] == "0.0.0.0"
    # gradio returns at once (A1111's API is mounted on its server next); launch itself blocks, as before
    assert calls[0]["prevent_thread_lock"] is True and blocked == [True]
    assert "/sdapi/v1/txt2img" in {route.path for route in stub.app.routes}
    # the generated images (A1111's folders), nothing else
    assert calls[0]["allowed_paths"] == [str(tmp_path / "out" / f) for f in ("txt2img-images", "img2img-images",
                                                                           "txt2img-grids")]
    assert calls[0]["max_file_size"] == app.MAX_UPLOAD[True]
    caplog.clear()
    app.launch(stub, app.parse_args(["--outputs", str(tmp_path / "out")]))
    assert not caplog.records and calls[1]["server_name"] == "127.0.0.1"
    assert calls[1]["max_file_size"] == app.MAX_UPLOAD[False]


def test_outputs_outside_the_working_and_temp_folders_are_served(tiny_model_dirs, tmp_path, monkeypatch):
    """Gradio serves only the working folder, its temp folder and allowed_paths: --outputs elsewhere must still
    show its images, and only them. Gradio's cache is swept (delete_cache)."""
    import tempfile

    import httpx

    from tests.conftest import running_app

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # so tmp_path/out is outside the temp folder
    with running_app(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path / "out")]) as (url, _):
        import app

        gallery, _, status, _ = Client(url, verbose=False).predict(prompt="x", steps=1, seed=2, api_name="/generate")
        assert read_png(gallery[0]["image"]).params["Seed"] == 2
        # the rest of --outputs (staged uploads, training runs) is not served by path
        (tmp_path / "out" / "train-data").mkdir(parents=True)
        (tmp_path / "out" / "train-data" / "upload.png").write_bytes(b"someone's data")
        with httpx.Client() as http:
            assert http.get(f"{url}gradio_api/file={tmp_path / 'out' / 'train-data' / 'upload.png'}").status_code >= 400
    assert list((tmp_path / "out").rglob("*.png")) and app.demo.delete_cache == app.CACHE_SWEEP


def test_a_public_app_shows_no_path_of_this_machine(tiny_model_dirs, tmp_path):
    """A public app started on a local folder names it (model list, status line, Train tab) by its folder name,
    which only the app maps back to the folder; the path itself is refused like any custom model."""
    import json

    import app

    folder = str(tiny_model_dirs["sd15"])
    args = app.parse_args(["--model", folder, "--outputs", str(tmp_path), "--share", "--allow-training"])
    demo = app.build_demo(args)
    page = json.dumps(demo.get_config_file(), default=str)
    assert folder not in page and json.dumps(folder)[1:-1] not in page
    name, engine = tiny_model_dirs["sd15"].name, demo.engine
    assert name in engine.model_choices(public=True) and name in engine.model_status()
    assert engine.chosen_model(name, public=True) == folder
    with pytest.raises(ValueError, match="not offered on this public app"):
        engine.chosen_model(folder, public=True)
    assert engine.chosen_model(folder, public=False) == folder  # a private app takes any folder


def test_a_client_that_goes_away_mid_run_frees_the_slot(client, app_server, app_url):
    """A visitor who closes the page (the client cancels) must not hold the one generation slot for the rest of a
    150-step run: the run stops after its current step and the next visitor is served."""
    import time

    engine = app_server[1]
    job = client.submit(prompt="long", steps=150, width=512, height=512, seed=4, api_name="/generate")
    deadline = time.time() + 60
    while not engine.generating(client.session_hash):
        assert time.time() < deadline, "job never started"
        time.sleep(0.05)
    job.cancel()
    deadline = time.time() + 30
    while engine.generating(client.session_hash):
        assert time.time() < deadline, "the abandoned run kept the slot"
        time.sleep(0.05)
    gallery, *_ = Client(app_url, verbose=False).predict(prompt="next visitor", steps=2, seed=1, api_name="/generate")
    assert len(gallery) == 1


def test_a_client_killed_mid_run_frees_the_slot(app_server, app_url, monkeypatch):
    """A client that vanishes without a word (its process killed, a dropped connection: no cancel is sent) must
    not hold the slot either: the server notices the stream is gone and stops the run early."""
    import subprocess
    import sys
    import time

    engine = app_server[1]
    results = []

    def recording(*args, **kwargs):  # the server runs in this process: see how each run ended
        out = type(engine).generate(engine, *args, **kwargs)
        results.append(out[0])
        return out

    monkeypatch.setattr(engine, "generate", recording)
    # the client prints once the run streams to it (its first update came), then waits: the kill cuts a live stream
    script = ("import sys, time; from gradio_client import Client; c = Client(sys.argv[1], verbose=False); "
              "print(c.session_hash, flush=True); "
              "job = c.submit(prompt='long', steps=150, width=1024, height=1024, seed=4, api_name='/generate')\n"
              "while not job.outputs(): time.sleep(0.02)\n"
              "print('streaming', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, app_url], stdout=subprocess.PIPE, text=True)
    try:
        session = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "streaming"
        deadline = time.time() + 120
        while not engine.generating(session):
            assert time.time() < deadline and not results, "the run never started, or ended before the kill"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 120
    while engine.generating(session) or not results:  # (the slot is freed just before the run returns)
        assert time.time() < deadline, "the vanished client's run kept the slot"
        time.sleep(0.05)
    assert results[0].interrupted_at is not None and results[0].interrupted_at < 150
    gallery, *_ = Client(app_url, verbose=False).predict(prompt="next visitor", steps=2, seed=1, api_name="/generate")
    assert len(gallery) == 1


@pytest.mark.parametrize("space", [True, False])
def test_a_public_app_pushes_only_on_a_space_with_the_visitors_login(tmp_path, monkeypatch, space):
    """A Space (hf_oauth in the README) with training on shows "Sign in with Hugging Face" beside Push; a share
    link without --auth shows neither (its visitors have no login to push with)."""
    import app

    import gradio.oauth

    if space:  # what a Space with hf_oauth: true sets (gradio.oauth read its part at import)
        oauth = dict(OAUTH_CLIENT_ID="id", OAUTH_CLIENT_SECRET="secret", OAUTH_SCOPES="openid profile write-repos",
                     OPENID_PROVIDER_URL="http://127.0.0.1:9")
        for k, v in dict(SYSTEM="spaces", SPACE_ID="me/sd", **oauth).items():
            monkeypatch.setenv(k, v)
        for k, v in oauth.items():
            monkeypatch.setattr(gradio.oauth, k, v)
    argv = ["--outputs", str(tmp_path), "--allow-training"] + ([] if space else ["--share"])
    components = app.build_demo(app.parse_args(argv)).get_config_file()["components"]
    shown = {str(c["props"].get("value")) for c in components if c["props"].get("visible", True) is not False}
    assert ("Push to Hub (private)" in shown) == space
    assert any("Sign in with Hugging Face" in v for v in shown) == space


def _finished_run(engine, name: str, owner: str, model: str):
    """A finished LoRA run's folder, as a job leaves it, started by ``owner``."""
    import json
    from dataclasses import asdict

    from sd_demo.train import jobs
    from sd_demo.train.config import TrainConfig

    folder = engine.jobs.root / name
    folder.mkdir(parents=True)
    (folder / jobs.JOB).write_text(json.dumps({"config": asdict(TrainConfig(model=model)), "owner": owner}))
    (folder / jobs.STATUS).write_text(json.dumps({"state": jobs.FINISHED}))
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return folder


def _handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__qualname__", "").endswith(name))


@pytest.mark.parametrize("public", [True, False])
def test_on_a_public_app_each_visitor_sees_and_controls_only_their_own_runs(tiny_model_dirs, tmp_path, public):
    """Two visitors of a public app with training on (each browser keeps its own id): the Train tab's runs table,
    re-attaching after a reload, Stop, Download, Use in Generate, the Generate tab's list of trained results and its
    LoRA field each show or take only the visitor's own runs; another's run is refused as if it were not there. A
    private app shows every run to its owner."""
    from contextlib import nullcontext

    import gradio as gr

    import app
    from sd_demo.train import jobs

    model = str(tiny_model_dirs["sd15"])
    flags = ["--share", "--allow-training"] if public else []
    demo = app.build_demo(app.parse_args(["--model", model, "--outputs", str(tmp_path), *flags]))
    engine = demo.engine
    ann = _finished_run(engine, "20260101-000000-ann", "~ann", model)
    bob = _finished_run(engine, "20260101-000001-bob", "~bob", model)

    refresh, stop, zip_, use = (_handler(demo, n) for n in ("refresh", "control.<locals>.handler", "make_zip", "use"))
    job_id, *_, runs, drawn = refresh("", "", "~ann")  # a reload: no job shown yet
    assert job_id == (ann.name if public else bob.name)  # the newest run this visitor may see
    assert [r[0] for r in runs] == ([ann.name] if public else [bob.name, ann.name])
    assert refresh("", "", None)[0] == (gr.skip() if public else bob.name)  # before the page has said who it is
    if public:
        for handler, args in ((stop, (bob.name, "~ann")), (zip_, (bob.name, "~ann")), (use, (bob.name, "~ann", ""))):
            with pytest.raises(gr.Error, match=f"no training job '{bob.name}'"):
                handler(*args)
        assert not (bob / jobs.STOP).exists()
    stop(ann.name, "~ann")
    assert (ann / jobs.STOP).exists()
    assert zip_(ann.name, "~ann")[0].endswith(f"{ann.name}.zip")
    assert use(ann.name, "~ann", "")[0] == f"{ann.name}:1"  # the run's name: no path of the server on the page
    assert engine.lora_sources([(ann.name, 0.5)], public, "~ann") == [(str(ann), 0.5)]
    with pytest.raises(ValueError, match="only your own training results") if public else nullcontext():
        assert engine.lora_sources([(bob.name, 1.0)], public, "~ann") == [(str(bob), 1.0)]  # not hers on a public app

    assert [r for _, r in engine.trained_results(public, "~ann")] == ([ann.name] if public else [bob.name, ann.name])
    generate = _handler(demo, "generate_gallery")
    with pytest.raises(gr.Error, match="only your own training results") if public else nullcontext():
        next(generate("x", steps=1, loras=str(bob), visitor="~ann"))
    identify = _handler(demo, "identify")
    browser, who = identify("")
    assert who == f"~{browser}" and len(browser) == 32 and identify(browser) == (browser, who)  # kept across reloads
    assert identify("")[0] != browser  # another browser, another visitor



def test_img2img_endpoint_inpaints_and_refuses_what_is_not_a_picture(client, tmp_path):
    """/img2img as a script uses it: a picture (an image editor's value) and a mask file; the unmasked pixels come
    back as they went in, the parameters say what was done. A text file named .png is one clear line."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (40, 0, 64, 64))
    m.save(mask)
    picture = {"background": handle_file(str(src)), "layers": [], "composite": None}
    gallery, _, status, text = client.predict(picture, handle_file(str(mask)), "a red square", steps=4, seed=3,
                                              strength=0.8, api_name="/img2img")
    out = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert (out[:, :30] == np.asarray(Image.open(src))[:, :30]).all()
    info = read_png(gallery[0]["image"]).params
    assert (info["Denoising strength"], info["Mask blur"], info["Init image size"]) == (0.8, 4, "64x64")
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    with pytest.raises(Exception) as err:
        client.predict({"background": handle_file(str(bad)), "layers": [], "composite": None}, None, "x", steps=2,
                       api_name="/img2img")
    assert "init_image: not a readable image" in str(err.value) and "Traceback" not in str(err.value)


def test_hires_fix_through_the_generate_endpoint(client):
    gallery, _, _, text = client.predict(prompt="a red circle", steps=2, seed=4, width=64, height=64, hires=True,
                                         hires_scale=1.5, hires_steps=2, api_name="/generate")
    from PIL import Image

    assert Image.open(gallery[0]["image"]).size == (96, 96)
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in text


def test_xyz_plot_through_the_generate_endpoint(client):
    gallery, _, status, _ = client.predict(prompt="a red circle", steps=2, seed=4, x_type="CFG scale",
                                           x_values="3, 6", y_type="Prompt S/R", y_values="red, blue",
                                           api_name="/generate")
    from PIL import Image

    sizes = [Image.open(g["image"]).size for g in gallery]
    assert len(gallery) == 5 and sizes[0][0] > 2 * sizes[1][0]  # the labelled grid, then its four cells
    assert [read_png(g["image"]).prompt for g in gallery[1:]] == ["a red circle"] * 2 + ["a blue circle"] * 2
    with pytest.raises(Exception) as err:
        client.predict(prompt="a red circle", steps=2, x_type="Steps", x_values="1-500", api_name="/generate")
    assert "at most 64 cells" in str(err.value)


def test_two_clients_queued_jobs_come_back_in_order_and_a_cancel_removes_only_that_job(app_server, app_url):
    """Two API clients submit three jobs each, interleaved, while a long job runs: each gets its own images back
    with its own seeds, the jobs run in the order submitted, and the one job cancelled while it waits never runs."""
    import json
    import time
    from pathlib import Path

    engine = app_server[1]
    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    first = a.submit(prompt="q long", steps=40, width=256, height=256, seed=100, api_name="/generate")
    deadline = time.time() + 60
    while not engine.generating(a.session_hash):
        assert time.time() < deadline, "the first job never started"
        time.sleep(0.02)
    jobs = {}
    for n in (1, 2):
        for client, who in ((a, "a"), (b, "b")):
            jobs[f"{who}{n}"] = client.submit(prompt=f"q {who} {n}", steps=2, seed=100 + 10 * n + (who == "b"),
                                              api_name="/generate")
            while len(engine.queued(None)) < 2 + len(jobs) - 1:  # each has joined the queue before the next
                assert time.time() < deadline, "a job did not join the queue"
                time.sleep(0.02)
    waiting = [job.label for job, _ in engine.queued(None)]
    assert waiting == ["q long", "q a 1", "q b 1", "q a 2", "q b 2"]
    assert [n for _, n in engine.queued(f"session:{b.session_hash}", public=True)] == [2, 4]  # b's places
    # the queue panel's Cancel, as client a (gradio_client's own Job.cancel resets the client's whole session)
    queued_a2 = next(job for job, _ in engine.queued(None) if job.label == "q a 2")
    with pytest.raises(ValueError):
        engine.cancel_queued(queued_a2.id, f"session:{b.session_hash}", public=True)  # b cannot cancel a's job
    engine.cancel_queued(queued_a2.id, f"session:{a.session_hash}", public=True)
    assert [job.label for job, _ in engine.queued(None)] == ["q long", "q a 1", "q b 1", "q b 2"]
    assert "cancelled" in jobs.pop("a2").result(timeout=120)[2]
    assert first.result(timeout=120)[0]
    for name, job in jobs.items():
        gallery, _, status, infotext = job.result(timeout=120)
        seed = 100 + 10 * int(name[1]) + (name[0] == "b")
        assert len(gallery) == 1 and read_png(gallery[0]["image"]).params["Seed"] == seed
        assert infotext.startswith(f"q {name[0]} {name[1]}\n")
    history = Path(engine.queue.history_path).read_text().splitlines()
    labels = [json.loads(line)["label"] for line in history]
    # finished in the order submitted; the cancelled one never ran
    assert [x for x in labels if x.startswith("q ")] == ["q long", "q a 1", "q b 1", "q b 2"]


def test_an_idle_app_leaves_the_cpu_to_the_denoising_threads(app_server):
    """Gradio's queue looks for events every 1 ms out of the box: an idle app took 3 % of a core, and on 2 cores those
    wake-ups slowed a generation by a fifth (BENCHMARKS.md, session 20). Ours wakes every 20 ms: 0.3 %."""
    import time

    time.sleep(0.5)
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(2)
    assert (time.process_time() - cpu) / (time.monotonic() - wall) < 0.015
