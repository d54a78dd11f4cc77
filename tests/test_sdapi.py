"""A1111's web API on the app (sd_demo.ui.sdapi), driven over HTTP as A1111's clients do."""
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_demo.generate import GenerationParams
from sd_demo.infotext import read_png
from tests.conftest import running_app

API = "sdapi/v1"  # after the app's URL, which ends in /


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_txt2img_draws_what_the_app_draws_and_fills_in_the_models_defaults(app_server):
    """A1111's body (its names) gives the picture the same call draws in-process, bit for bit, with its parameters
    in the PNG and in ``info``; what it leaves out (size, sampler, CFG) comes from the model, not A1111's 512 px."""
    url, engine = app_server
    body = {"prompt": "a red circle", "negative_prompt": "blue", "seed": 11, "steps": 4, "cfg_scale": 6,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2, "restore_faces": False,
            "n_iter": 1, "send_images": True}
    r = httpx.post(url + API + "/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    images = [decode(b) for b in answer["images"]]
    info = json.loads(answer["info"])
    assert len(images) == 2 and info["all_seeds"] == [11, 12] and answer["parameters"] == body
    size = engine.load().default_size
    assert images[0].size == (size, size) and (info["width"], info["height"]) == (size, size)
    assert (info["sampler_name"], info["scheduler"], info["cfg_scale"], info["steps"]) == ("DPM++ 2M", "Karras", 6, 4)
    text = read_png(images[1])
    assert text.prompt == "a red circle" and text.params["Seed"] == 12 and "Seed: 12" in info["infotexts"][1]
    same, _ = engine.generate(GenerationParams(prompt="a red circle", negative_prompt="blue", seed=11, steps=4,
                                               guidance_scale=6, sampler="DPM++ 2M", schedule="Karras",
                                               batch_size=2), save=False)
    for ours, theirs in zip(same.images, images):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert("RGB")))
    names = [m["title"] for m in httpx.get(url + API + "/sd-models").json()]
    assert httpx.get(url + API + "/options").json()["sd_model_checkpoint"] in names
    assert {"Euler a", "DPM++ 2M"} <= {s["name"] for s in httpx.get(url + API + "/samplers").json()}
    assert "Karras" in {s["name"] for s in httpx.get(url + API + "/schedulers").json()}


def test_img2img_and_inpainting_read_a1111s_fields_as_the_tab_does(app_server):
    """init_images, mask and A1111's numbered choices (resize_mode 1, inpainting_fill 2, inpaint_full_res, an
    inverted mask) draw what the same img2img / inpainting call draws in-process, bit for bit."""
    from PIL import ImageOps

    url, engine = app_server
    size = engine.load().default_size
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size * 2, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 255)
    mask.paste(0, (size * 2 // 3, 0, size, size))  # inverted below: the right third is redrawn
    body = {"init_images": ["data:image/png;base64," + b64_png(picture)], "prompt": "a red circle", "seed": 5,
            "steps": 4, "denoising_strength": 0.6, "resize_mode": 1}
    cases = [(body, dict(resize_mode="Crop and resize"), None),
             ({**body, "mask": b64_png(mask), "inpainting_mask_invert": 1, "inpainting_fill": 2, "mask_blur": 0,
               "inpaint_full_res": True, "inpaint_full_res_padding": 8},
              dict(resize_mode="Crop and resize", masked_content="latent noise", mask_blur=0, only_masked=True,
                   only_masked_padding=8), ImageOps.invert(mask))]
    for request, fields, ours_mask in cases:
        r = httpx.post(url + API + "/img2img", json=request, timeout=120)
        assert r.status_code == 200, r.text
        same, _ = engine.generate(GenerationParams(prompt="a red circle", seed=5, steps=4, strength=0.6, **fields),
                                  init_image=picture, mask=ours_mask, save=False)
        assert np.array_equal(np.asarray(decode(r.json()["images"][0]).convert("RGB")), np.asarray(same.images[0]))
        assert json.loads(r.json()["info"])["infotexts"][0].count("Denoising strength: 0.6") == 1


@pytest.mark.parametrize("body, detail", [
    ({"prompt": "x", "cfg_scale": "lots"}, "cfg_scale: "),
    ({"prompt": "x", "width": 100}, "width: 100 px is not allowed; use a multiple of 8"),
    ({"prompt": "x", "restore_faces": True}, "restore_faces: not supported by this app; leave it out"),
    ({"prompt": "x", "n_iter": 3}, "n_iter: one batch per request here; use batch_size"),
    ({"prompt": "x", "sampler_name": "Nope"}, "sampler_name: "),
    ([1, 2], "the request body must be a JSON object (Content-Type: application/json)"),
])
def test_bad_requests_get_one_line_naming_a1111s_field(app_server, body, detail):
    url, _ = app_server
    r = httpx.post(url + API + "/txt2img", json=body, timeout=60)
    assert r.status_code == 422 and r.json()["detail"].startswith(detail) and "\n" not in r.json()["detail"]


def test_img2img_refuses_a_missing_or_broken_picture(app_server):
    url, _ = app_server
    for body, detail in [({"prompt": "x"}, "init_images: give one base64-encoded image"),
                         ({"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]}, "init_images: not a base64-encoded"),
                         ({"init_images": [b64_png(Image.new("RGB", (64, 64)))], "resize_mode": 3},
                          "resize_mode: use one of 0 (Just resize), 1 (Crop and resize), 2 (Resize and fill)")]:
        r = httpx.post(url + API + "/img2img", json=body, timeout=60)
        assert r.status_code == 422 and r.json()["detail"].startswith(detail), r.text


def test_with_auth_the_api_wants_a_login_and_a_public_app_keeps_its_limits(tiny_model_dirs, tmp_path):
    """--auth: HTTP Basic with one of its pairs (gradio's login does not cover these routes). A public app offers
    only its list of models, and no interrupt (every API caller shares its Stop key)."""
    argv = ["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path / "out")]
    routes = [("POST", "txt2img"), ("POST", "img2img"), ("POST", "interrupt"), ("GET", "samplers"),
              ("GET", "schedulers"), ("GET", "sd-models"), ("GET", "options")]
    with running_app([*argv, "--auth", "ann:pw"]) as (url, engine):
        for method, route in routes:
            for auth in (None, ("ann", "nope"), ("bob", "pw")):
                r = httpx.request(method, f"{url}{API}/{route}", auth=auth, json={"prompt": "x", "steps": 1})
                assert r.status_code == 401, (route, auth)
        assert engine.history(None) == []  # nothing ran
        assert httpx.get(url + API + "/samplers", auth=("ann", "pw")).status_code == 200
        assert httpx.post(url + API + "/interrupt", auth=("ann", "pw")).status_code == 200
    with running_app([*argv, "--host", "0.0.0.0"]) as (url, _):
        r = httpx.post(url + API + "/txt2img", timeout=60,
                       json={"prompt": "x", "override_settings": {"sd_model_checkpoint": str(tmp_path)}})
        assert r.status_code == 422 and "is not offered on this public app" in r.json()["detail"]
        assert httpx.post(url + API + "/interrupt").status_code in (404, 405)


def test_other_sites_pages_and_oversized_bodies_are_refused(app_server):
    """A page of another site posting into a local app (a text/plain POST needs no CORS preflight) runs nothing,
    nor does a body that is not JSON; a body over the upload limit is refused before it is all read."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sd_demo.ui import sdapi

    url, engine = app_server
    before = len(engine.history(None))
    evil = httpx.post(url + API + "/txt2img", content='{"prompt": "x", "steps": 1}',
                      headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
    assert evil.status_code == 403
    plain = httpx.post(url + API + "/txt2img", content='{"prompt": "x", "steps": 1}',
                       headers={"Content-Type": "text/plain"})
    assert plain.status_code == 422 and plain.json()["detail"].startswith("the request body must be a JSON object")
    assert len(engine.history(None)) == before
    small = FastAPI()
    sdapi.mount(small, engine, public=True, logins=None, max_bytes=1000)
    big = TestClient(small).post("/sdapi/v1/img2img", json={"prompt": "x" * 2000})
    assert big.status_code == 413 and "upload limit" in big.json()["detail"]


def test_interrupt_stops_the_apis_running_job(app_server):
    """POST /interrupt (A1111's) stops the API's run after its current step; the answer still holds its picture."""
    import threading
    import time

    from sd_demo.runqueue import RUNNING, STOPPED
    from sd_demo.ui import sdapi

    url, engine = app_server
    answer = {}
    run = threading.Thread(target=lambda: answer.update(r=httpx.post(
        url + API + "/txt2img", json={"prompt": "a red circle", "seed": 1, "steps": 150}, timeout=120)))
    run.start()
    deadline = time.monotonic() + 60
    while not any(job.state == RUNNING for job, _ in engine.queued(sdapi.OWNER, public=True)):
        assert time.monotonic() < deadline, "the API's job never started"
        time.sleep(0.01)
    assert httpx.post(url + API + "/interrupt").status_code == 200
    run.join(60)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    assert engine.history(None)[0].state == STOPPED
