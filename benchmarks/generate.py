"""Our generation path vs stock diffusers, side by side in one run.

    python benchmarks/generate.py [--model DIR] [--steps 20] [--runs 10] [--size 64] [--sampler "DPM++ 2M"]

Stock is ``StableDiffusionPipeline.from_pretrained(path)(prompt, ...)`` with the same scheduler config, steps, seed
and CPU generator; ours is ``sd_demo.engine.Engine.generate``. Peak RSS, load time and the image come from each
side alone in a child process; s/image is the median of --runs (after a warm-up) with both sides alternating in
one process, so both see the same machine load. Also prints the maximum pixel difference between the two images.
Without --model a tiny random SD 1.x model is built in a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
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
SIDES = ("stock", "ours")


def make_runner(side: str, model: str, steps: int, sampler: str, seed: int, size: int):
    """Load one side and return a function producing its image (loading is included in the child's RSS)."""
    import torch

    if side == "stock":
        from diffusers import StableDiffusionPipeline

        from sd_demo.sampling.registry import make_scheduler

        pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = make_scheduler(sampler, "Automatic", dict(pipe.scheduler.config))  # a diffusers class
        pipe.set_progress_bar_config(disable=True)

        def once():
            g = torch.Generator("cpu").manual_seed(seed)
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, generator=g, height=size,
                        width=size).images[0]
        return once
    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    engine = Engine(EngineSettings(model=model))
    engine.load()
    params = GenerationParams(prompt=PROMPT, steps=steps, guidance_scale=7.0, seed=seed, sampler=sampler,
                              width=size, height=size)
    return lambda: engine.generate(params, save=False)[0].images[0]


def run_child(side: str, a, out: Path) -> None:
    """Peak RSS and the image of one side, alone in its process."""
    t0 = time.perf_counter()
    once = make_runner(side, a.model, a.steps, a.sampler, a.seed, a.size)
    load_s = time.perf_counter() - t0
    image = once()
    np.save(out.with_suffix(".npy"), np.asarray(image))
    rss_mb = peak_rss_mb()
    out.write_text(json.dumps({"load_s": load_s, "peak_rss_mb": rss_mb}))


def time_alternating(a) -> dict[str, float]:
    """Median s/image with the two sides alternating in one process, so both see the same machine load."""
    runners = {side: make_runner(side, a.model, a.steps, a.sampler, a.seed, a.size) for side in SIDES}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:
        runners[side]()  # warm-up
    for _ in range(a.runs):
        for side in SIDES:
            t = time.perf_counter()
            runners[side]()
            times[side].append(time.perf_counter() - t)
    return {side: statistics.median(v) for side, v in times.items()}


def build_default_model() -> str:
    from tests.tiny_models import build_tiny_sd

    return str(build_tiny_sd("sd15", Path(tempfile.mkdtemp()) / "tiny-sd15"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="local diffusers SD 1.x/2.x folder (default: a tiny random SD 1.x)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=64, help="image side in px")
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        run_child(a.side, a, Path(a.out))
        return
    a.model = a.model or build_default_model()
    tmp = Path(tempfile.mkdtemp())
    res, images = {}, {}
    for side in SIDES:
        out = tmp / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--model", a.model, "--steps", str(a.steps), "--size",
               str(a.size), "--sampler", a.sampler, "--seed", str(a.seed), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        res[side] = json.loads(out.read_text())
        images[side] = np.load(out.with_suffix(".npy")).astype(int)
    speed = time_alternating(a)
    diff = int(np.abs(images["stock"] - images["ours"]).max())
    print(f"model: {a.model}\nsize: {a.size}px, steps: {a.steps}, sampler: {a.sampler}, "
          f"runs: {a.runs} alternating (median), CPU threads: {os.cpu_count()}")
    print(f"{'':8}{'s/image':>10}{'load s':>9}{'peak RSS MB':>13}")
    for side in SIDES:
        print(f"{side:8}{speed[side]:>10.4f}{res[side]['load_s']:>9.2f}{res[side]['peak_rss_mb']:>13.0f}")
    print(f"time ratio ours/stock: {speed['ours'] / speed['stock']:.3f}   max pixel difference: {diff}")


if __name__ == "__main__":
    main()
