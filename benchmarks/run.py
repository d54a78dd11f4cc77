"""Issue 19's suite: every row is ours against stock diffusers (or the in-process call), measured alternately in one
run on the same machine, with the ratio, each side's peak RSS and how far the outputs differ.

    python -m benchmarks [--runs 3] [--sd15-sizes 256,512] [--sd15-steps 5] [--sd15-sides ours,ours-fast]
        [--sd15-model DIR] [--sdxl | --sdxl-model DIR] [--sdxl-size 512] [--sdxl-steps 5] [--sdxl-sides ...]
        [--skip-sd15] [--skip-embedded] [--skip-app] [--skip-train]

Rows:
1. the embedded model (128 px, 20 steps, its card's sampler and CFG): stock ``StableDiffusionPipeline`` vs
   ``Engine.generate``, exact and with the fast switches (Deep cache 3, then the Fast choice); image to image at
   strength 0.75 (stock ``StableDiffusionImg2ImgPipeline`` vs
   ``Engine.generate`` with the picture); and the app end to end (gradio_client against ``python app.py`` in a
   child process) vs ``Engine.generate`` in this process.
2. SD 1.5's architecture with random weights (``benchmarks/sd15.py``, no download), per size: stock vs ours in fp32
   (the exact path: max pixel difference), compiled (``--compile``: max pixel difference and the first image's
   extra wait), and the approximate switches, each alone and then together (PSNR against
   the exact image): bf16 (``--dtype bf16``; fast where the CPU has AMX / AVX-512 BF16, slow elsewhere),
   ``cfg_cutoff`` 0.6 (the negative prompt's pass dropped for the last 40 % of the steps), ``deep_cache`` 3 (the
   UNet's deep blocks every third step, sd_demo.deepcache), ``tiny_vae`` (a TAESD decoder), ``autocast`` (the UNet
   and the VAE decoder in bf16 under torch.autocast; only where the CPU computes bf16 natively), the Fast choice
   (the first two, and autocast where it pays), Fast without autocast, Fast with the tiny VAE, and Fast in bf16. The
   fast
   switches' quality is judged on the embedded model by the project's evaluator (BENCHMARKS.md), not by the PSNR
   of random weights.
3. with ``--sdxl``: SDXL's architecture with random weights at 512 px, stock against our sides, each image made by
   its own process (two fp32 SDXL pipelines do not fit 24 GB in one).
4. a LoRA training step on (1) at 128 px and on (2) at 256 px: ours vs the diffusers example's loop
   (``benchmarks/train.py``), the sides alternating run by run, each in a child process.
5. cold start: process start to the first image (the CLI vs a stock script), and peak RSS while loading.

Then the achieved GFLOP/s of one SD 1.5 UNet call against this machine's fp32 matrix-multiply rate (a large sgemm),
so the table says how far from the limit a step is. Timings are medians of --runs after one warm-up; sides
alternate so both see the same machine load. Peak RSS comes from each side alone in a child process.
"""
from __future__ import annotations

import argparse
import base64
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.rss import peak_rss_mb  # noqa: E402  (after the path: run as a script too)
PROMPT = "a red circle on a blue background"
SEED = 7


# Our sides: (dtype, --compile, GenerationParams switches). The exact path, compiled (--compile torch or openvino:
# the same pixels), each approximate switch alone, then the Fast choice (Deep cache 3, CFG cutoff 0.6, and bf16
# autocast where the CPU computes bf16 natively), Fast without autocast (fp32 throughout), Fast with the tiny VAE,
# Fast in bf16, Fast compiled. A side ending in IMG2IMG (stock's too) redraws a picture at STRENGTH instead of
# starting from noise.
OURS = {"ours": ("auto", "", {}), "ours-compile": ("auto", "torch", {}), "ours-bf16": ("bf16", "", {}),
        "ours-openvino": ("auto", "openvino", {}),
        "ours-cutoff": ("auto", "", {"cfg_cutoff": 0.6}), "ours-deepcache": ("auto", "", {"deep_cache": 3}),
        "ours-tinyvae": ("auto", "", {"tiny_vae": True}),
        "ours-fast-tinyvae": ("auto", "", {"fast": True, "tiny_vae": True}),
        "ours-autocast": ("auto", "", {"autocast": True}),
        "ours-fast-fp32": ("auto", "", {"deep_cache": 3, "cfg_cutoff": 0.6}),
        "ours-fast": ("auto", "", {"fast": True}), "ours-fast-bf16": ("bf16", "", {"fast": True}),
        "ours-fast-openvino": ("auto", "openvino", {"fast": True}),
        "ours-fast-tinyvae-openvino": ("auto", "openvino", {"fast": True, "tiny_vae": True})}
EMBEDDED_SIDES = ["stock", "ours", "ours-deepcache", "ours-fast"]  # bf16 does not pay at 128 px
IMG2IMG, STRENGTH = "-img2img", 0.75


_ENGINES: dict = {}


def default_sides() -> list[str]:
    """Every side of OURS this CPU can run: autocast only where it computes bf16 natively."""
    from sd_demo.models import native_bf16

    return [side for side, (_, _, switches) in OURS.items() if native_bf16() or "autocast" not in switches]


def runner(side: str, model: str, size: int | None, steps: int):
    """A function producing one image (an HxWx3 uint8 array) for a side: 'stock' or one of OURS."""
    import torch

    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    from sd_demo.models import EMBEDDED_DIR, card_settings, peek

    # the settings our side takes from the model card, read without loading anything (stock's RSS is its own)
    folder = EMBEDDED_DIR if model == "embedded" else Path(model)
    size = size or peek(model)[1]
    cfg, sampler, _ = card_settings(folder)
    init = source(size) if side.endswith(IMG2IMG) else None
    if side.startswith("stock"):
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        from sd_demo.sampling.registry import make_scheduler

        kind = AutoPipelineForText2Image if init is None else AutoPipelineForImage2Image
        sd = {} if peek(model)[0] == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
        pipe = kind.from_pretrained(str(folder), dtype=torch.float32, **sd)
        pipe.scheduler = make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        extra = dict(height=size, width=size) if init is None else dict(image=init, strength=STRENGTH)

        def once():
            g = torch.Generator("cpu").manual_seed(SEED)
            return np.asarray(pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg, generator=g,
                                   **extra).images[0])
        return once
    dtype, compiled, switches = OURS[side.removesuffix(IMG2IMG)]
    key = (model, dtype, compiled)
    if key not in _ENGINES:  # our sides of one dtype share a pipeline: seven SD 1.5 copies filled 24 GB
        _ENGINES[key] = Engine(EngineSettings(model=model, dtype=dtype, compile=compiled))
        _ENGINES[key].load()
    engine = _ENGINES[key]
    params = GenerationParams(prompt=PROMPT, steps=steps, seed=SEED, width=size, height=size,
                              strength=STRENGTH if init is not None else None, **switches)

    def once():
        result = engine.generate(params, save=False, init_image=init)[0]
        if result.warnings:  # a switch that could not run (a tiny VAE missing, say) would time something else
            raise RuntimeError(f"{side}: {'; '.join(result.warnings)}")
        return np.asarray(result.images[0])
    return once


def source(size: int):
    """img2img's picture: a rendered scene of the shapes world ("a yellow square at the top left on a purple
    background"), at the workload's size."""
    from sd_demo.shapes.vocab import Color, Position, Shape
    from sd_demo.shapes.world import make_scene, render

    return render(make_scene(Shape.SQUARE, Color.YELLOW, Color.PURPLE, position=Position.TOP_LEFT), size)


def child(side: str, model: str, size: int | None, steps: int, out: Path) -> None:
    t0 = time.perf_counter()
    once = runner(side, model, size, steps)
    load_s = time.perf_counter() - t0
    image = once()
    np.save(out.with_suffix(".npy"), image)
    out.write_text(json.dumps({"load_s": load_s, "first_image_s": time.perf_counter() - t0,
                               "peak_rss_mb": peak_rss_mb()}))


def alone(side: str, model: str, size: int | None, steps: int) -> tuple[dict, np.ndarray]:
    """(load s, first image s, peak RSS) and the image of one side, alone in a fresh process."""
    out = Path(tempfile.mkdtemp()) / f"{side}.json"
    cmd = [sys.executable, "-m", "benchmarks.run", "--child", side, "--model", model, "--steps", str(steps),
           "--size", str(size or 0), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))


def alternate(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds of each function, alternating. Each runs on the engine's device thread, stock too: torch work
    on two live threads halves both on a small CPU (sd_demo.engine.DeviceThread), and a stock script has one."""
    from sd_demo.engine import DEVICE

    for f in fns.values():
        DEVICE.call(f)  # warm-up
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            DEVICE.call(f)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def compare(model: str, size: int | None, steps: int, sides: list[str], runs: int, label: str) -> list[dict]:
    """Rows of ``sides[1:]`` against ``sides[0]`` on one workload."""
    solo = {s: alone(s, model, size, steps) for s in sides}
    from sd_demo.engine import DEVICE

    speed = alternate({s: DEVICE.call(runner, s, model, size, steps) for s in sides}, runs)
    return rows_of(solo, speed, sides, label)


def compare_apart(model: str, size: int, steps: int, sides: list[str], runs: int, label: str) -> list[dict]:
    """As ``compare``, each image made by a fresh process (its first image, load excluded), the sides alternating:
    for SDXL, whose fp32 pipelines do not fit 24 GB two at a time."""
    times, solo = {s: [] for s in sides}, {}
    for _ in range(runs):
        for s in sides:
            solo[s] = alone(s, model, size, steps)
            times[s].append(solo[s][0]["first_image_s"] - solo[s][0]["load_s"])
    return rows_of(solo, {s: statistics.median(v) for s, v in times.items()}, sides, label)


def rows_of(solo: dict, speed: dict, sides: list[str], label: str) -> list[dict]:
    base, ref = sides[0], solo[sides[0]][1].astype(int)
    exact = solo.get("ours", solo[base])[1]
    rows = []
    for s in sides[1:]:
        img = solo[s][1]
        if s in ("ours", "ours-compile", "ours-openvino"):
            diff = f"max pixel Δ {int(np.abs(img.astype(int) - ref).max())}"
            if s != "ours" and "ours" in solo:  # its first image waits for the compile
                diff += f"; warm-up {solo[s][0]['first_image_s'] - solo['ours'][0]['first_image_s']:.0f} s"
        elif s.endswith(IMG2IMG):  # stock samples the picture's latents, we take their mean: not the same pixels
            diff = f"PSNR {psnr(img, solo[base][1]):.1f} dB vs stock"
        else:
            diff = f"PSNR {psnr(img, exact):.1f} dB vs exact"
        rows.append({"workload": label, "ours": s, "vs": base, "ours_s": speed[s], "vs_s": speed[base],
                     "speedup": speed[base] / speed[s], "ours_rss": solo[s][0]["peak_rss_mb"],
                     "vs_rss": solo[base][0]["peak_rss_mb"], "output": diff})
    return rows


def app_rows(runs: int) -> list[dict]:
    """The embedded model through the launched app vs the same call in this process: with gradio_client, and with
    the plain HTTP API (POST /gradio_api/call/generate, then its event stream and the PNG, as curl or a web page
    would; gradio_client adds its own polling), and with A1111's API (POST /sdapi/v1/txt2img: one round trip)."""
    import httpx
    from gradio_client import Client

    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, url = tempfile.mkdtemp(), f"http://127.0.0.1:{port}"
    app = subprocess.Popen([sys.executable, "app.py", "--model", "embedded", "--port", str(port), "--outputs", out],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = Client(url + "/", verbose=False)
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
        data = [{"prompt": PROMPT, "seed": SEED}.get(p["parameter_name"], p.get("parameter_default")) for p in api]
        http = httpx.Client(timeout=120)

        def plain_http():
            event = http.post(url + "/gradio_api/call/generate", json={"data": data}).json()["event_id"]
            with http.stream("GET", f"{url}/gradio_api/call/generate/{event}") as stream:
                lines = list(stream.iter_lines())
            result = json.loads(lines[lines.index("event: complete") + 1].removeprefix("data:"))
            http.get(result[0][0]["image"]["url"]).raise_for_status()

        def a1111_api():
            r = http.post(url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": SEED})
            r.raise_for_status()
            base64.b64decode(r.json()["images"][0])

        engine = Engine(EngineSettings(model="embedded", outputs=out))
        params = GenerationParams(prompt=PROMPT, seed=SEED)
        speed = alternate({"in-process": lambda: engine.generate(params, save=True),
                           "app (gradio_client)": lambda: client.predict(prompt=PROMPT, seed=SEED,
                                                                         api_name="/generate"),
                           "app (HTTP API)": plain_http, "app (A1111 API)": a1111_api}, runs)
    finally:
        app.terminate()
    return [{"workload": "embedded 128 px, 20 steps", "ours": side, "vs": "in-process", "ours_s": speed[side],
             "vs_s": speed["in-process"], "speedup": speed["in-process"] / speed[side], "ours_rss": None,
             "vs_rss": None, "output": "same call"} for side in ("app (gradio_client)", "app (HTTP API)",
                                                                  "app (A1111 API)")]


def cold_start() -> dict:
    """Process start to the first image on the embedded model: the CLI vs a stock diffusers script."""
    stock = ("import sys, torch; from diffusers import StableDiffusionPipeline as P; "
             "from sd_demo.models import EMBEDDED_DIR; from sd_demo.sampling.registry import make_scheduler; "
             "p = P.from_pretrained(str(EMBEDDED_DIR), safety_checker=None, requires_safety_checker=False, dtype=torch.float32); "
             "p.scheduler = make_scheduler('Euler a', 'Automatic', dict(p.scheduler.config)); "
             f"p({PROMPT!r}, num_inference_steps=20, guidance_scale=2.5, height=128, width=128, "
             f"generator=torch.Generator().manual_seed({SEED})).images[0].save(sys.argv[1])")
    out = tempfile.mkdtemp()
    cmds = {"CLI": [sys.executable, "-m", "sd_demo", "generate", "--model", "embedded", "--prompt", PROMPT,
                    "--seed", str(SEED), "--out", f"{out}/ours.png"],
            "stock": [sys.executable, "-c", stock, f"{out}/stock.png"]}
    res = {}
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        res[name] = (time.perf_counter() - t0, int(proc.stderr.strip().splitlines()[-1]) / 1024)
    return {"workload": "cold start, embedded, 1 image", "ours": "CLI", "vs": "stock script",
            "ours_s": res["CLI"][0], "vs_s": res["stock"][0], "speedup": res["stock"][0] / res["CLI"][0],
            "ours_rss": res["CLI"][1], "vs_rss": res["stock"][1], "output": "process start to PNG"}


def train_row(model: str, size: int, runs: int, label: str, steps: int = 12, warmup: int = 3) -> dict:
    """A LoRA training step (benchmarks/train.py: rank 8 on the attention projections, batch 1): ours (latents and
    text embeddings cached once) vs the diffusers example's loop, each side in a child process of its own, the
    sides alternating ``runs`` times; the median steady-state s/step. (The losses of a dozen batch-1 steps at
    random timesteps say nothing about either side: ``benchmarks/train.py`` compares them over longer runs.)"""
    from benchmarks import train

    data = Path(tempfile.mkdtemp()) / "data"
    train.make_data(data, 8, size)
    got = {"stock": [], "ours": []}
    for _ in range(runs):
        for side in got:
            got[side].append(train.measure(side, model, data, steps, size, 1))
    per = {side: statistics.median(train.per_step(r, warmup) for r in rs) for side, rs in got.items()}
    rss = {side: max(r["peak_rss_mb"] for r in rs) for side, rs in got.items()}
    return {"workload": label, "ours": "LoRA step", "vs": "diffusers example", "ours_s": per["ours"],
            "vs_s": per["stock"], "speedup": per["stock"] / per["ours"], "ours_rss": rss["ours"],
            "vs_rss": rss["stock"], "output": "same recipe: LoRA rank 8 on q/k/v/out, lr 1e-4"}


def gflops(model: str, size: int) -> str:
    """Achieved GFLOP/s of one UNet call (CFG batch of 2) against a large fp32 sgemm on this machine."""
    from sd_demo.engine import DEVICE

    return DEVICE.call(_gflops, model, size)


def _gflops(model: str, size: int) -> str:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sd_demo.models import load_model

    unet = load_model(model).pipe.unet
    x, t, ctx = torch.randn(2, 4, size // 8, size // 8), torch.tensor(500), torch.randn(2, 77, 768)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=ctx)
        flops = counter.get_total_flops()
        unet_s = min(_timed(lambda: unet(x, t, encoder_hidden_states=ctx)) for _ in range(2))
        a = torch.randn(4096, 4096)
        gemm_s = min(_timed(lambda: a @ a) for _ in range(3))
    achieved, peak = flops / unet_s / 1e9, 2 * 4096**3 / gemm_s / 1e9
    return (f"SD 1.5 UNet at {size} px (batch 2): {flops / 1e9:.0f} GFLOP in {unet_s:.2f} s = {achieved:.0f} GFLOP/s; "
            f"this CPU's fp32 sgemm: {peak:.0f} GFLOP/s ({achieved / peak:.0%} of it)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def table(rows: list[dict]) -> str:
    lines = ["| workload | ours | vs | ours s | vs s | speed-up | ours peak RSS MB | vs peak RSS MB | output |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rss = [f"{r[k]:.0f}" if r[k] else "" for k in ("ours_rss", "vs_rss")]
        lines.append(f"| {r['workload']} | {r['ours']} | {r['vs']} | {r['ours_s']:.3f} | {r['vs_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {rss[0]} | {rss[1]} | {r['output']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sd15-sizes", default="256,512")
    ap.add_argument("--sd15-steps", type=int, default=5, help="steps per SD 1.5 image (each costs seconds on a CPU)")
    ap.add_argument("--sd15-sides", help=f"comma-separated, of {', '.join(OURS)} (default: all this CPU runs)")
    ap.add_argument("--sd15-model", help="a folder benchmarks/sd15.py built before (default: build one, ~2 min)")
    ap.add_argument("--sdxl", action="store_true", help="add SDXL's architecture (random weights, ~7 GB built in a "
                    "temporary folder), each image in its own process")
    ap.add_argument("--sdxl-model", help="a folder benchmarks/sd15.py's build_sdxl made before")
    ap.add_argument("--sdxl-size", type=int, default=512)
    ap.add_argument("--sdxl-steps", type=int, default=5)
    ap.add_argument("--sdxl-sides", default="ours,ours-fast,ours-fast-bf16", help="comma-separated, of OURS")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--skip-embedded", action="store_true", help="leave out the embedded model's generation rows")
    ap.add_argument("--skip-app", action="store_true")
    ap.add_argument("--skip-train", action="store_true", help="leave out the LoRA training step rows")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, a.model, a.size or None, a.steps, Path(a.out))
    import torch

    print(f"# {time.strftime('%Y-%m-%d')} · torch {torch.__version__} · {os.cpu_count()} CPU threads · "
          f"runs {a.runs} (median, alternating)\n", flush=True)
    rows = []
    if not a.skip_embedded:
        rows += compare("embedded", None, 20, EMBEDDED_SIDES, a.runs, "embedded 128 px, 20 steps")
        rows += compare("embedded", None, 20, ["stock" + IMG2IMG, "ours" + IMG2IMG], a.runs,
                        f"embedded img2img 128 px, strength {STRENGTH}, 20 steps")
    if not a.skip_app:
        rows += app_rows(a.runs)
    if not a.skip_train:
        from sd_demo.models import EMBEDDED_DIR

        rows.append(train_row(str(EMBEDDED_DIR), 128, a.runs, "training, embedded 128 px, batch 1"))
    notes = []
    if not a.skip_sd15:
        from benchmarks.sd15 import build_sd15

        sd15 = a.sd15_model or build_sd15(Path(tempfile.mkdtemp()))
        for size in (int(s) for s in a.sd15_sizes.split(",")):
            rows += compare(sd15, size, a.sd15_steps, ["stock", *(a.sd15_sides.split(",") if a.sd15_sides else
                                                                  default_sides())],
                            a.runs,
                            f"SD 1.5 arch {size} px, {a.sd15_steps} steps")
        if not a.skip_train:
            rows.append(train_row(sd15, 256, a.runs, "training, SD 1.5 arch 256 px, batch 1", steps=6, warmup=2))
        notes.append(gflops(sd15, 512))
    if a.sdxl or a.sdxl_model:
        from benchmarks.sd15 import build_sdxl

        sdxl = a.sdxl_model or build_sdxl(Path(tempfile.mkdtemp()))
        rows += compare_apart(sdxl, a.sdxl_size, a.sdxl_steps, ["stock", *a.sdxl_sides.split(",")], a.runs,
                              f"SDXL arch {a.sdxl_size} px, {a.sdxl_steps} steps")
    if not a.skip_embedded:
        rows.append(cold_start())
    print(table(rows))
    for n in notes:
        print(f"\n{n}")


if __name__ == "__main__":
    main()
