"""GPU checks and timings on an SD 1.5-sized model with random weights (no Hub access needed).

    python benchmarks/gpu.py [--out FILE.json] [--size 512] [--steps 20] [--runs 3] [--train-steps 20]
                             [--train lora:fp16 lora:fp16:compile full:bf16:gc ...] [--skip-generate]

Generation (512 px, 20 steps DPM++ 2M, CFG 7, batch 1): stock diffusers ``StableDiffusionPipeline`` in fp16 (its
default SDPA attention) against our path (``sd_demo.models.load_model`` + ``sd_demo.generate.generate``) in fp32,
fp16 and bf16 with PyTorch SDPA, and fp16 with xformers where its kernels work. s/image is the median of --runs
after a warm-up; peak memory is ``torch.cuda.max_memory_allocated`` over load and generation.

Training (``sd_demo.train.loop.train``, 512 px, batch 2): LoRA r8 with each --mixed-precision, with and without
gradient checkpointing, a full fine-tune and textual inversion in fp16. s/step is the median after 3 warm-up steps;
also the optimizer class (8-bit AdamW when bitsandbytes works) and whether every loss was finite.

Random weights say nothing about image quality, only speed, memory and that each path runs. ``--tiny`` swaps in the
tests' tiny SD 1.x and the CPU, to check the script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "a red circle on a blue background"


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _timed(once, runs: int) -> tuple[float, np.ndarray]:
    image = np.asarray(once())  # warm-up (cuDNN autotuning, kernel loading)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        image = np.asarray(once())
        times.append(time.perf_counter() - t)
    return statistics.median(times), image


def gen_stock(model: str, a) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_demo.sampling.registry import make_scheduler

    _free()
    dtype = torch.float32 if a.tiny else torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(a.device)
    pipe.scheduler = make_scheduler("DPM++ 2M", "Automatic", dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)

    def once():
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=7.0, generator=g, height=a.size,
                    width=a.size).images[0]
    sec, image = _timed(once, a.runs)
    row = {"what": "generate", "side": "stock diffusers", "dtype": "fp32" if a.tiny else "fp16",
           "attention": "SDPA (diffusers default)", "s_per_image": sec, "peak_gib": _peak_gib()}
    return row | {"_image": image}


def gen_ours(model: str, a, dtype: str, attention: str) -> dict:
    from sd_demo.generate import GenerationParams, generate
    from sd_demo.models import load_model

    _free()
    try:
        m = load_model(model, device=a.device, dtype=dtype, attention=attention)
    except ValueError as exc:  # e.g. xformers without working kernels: reported, not fatal
        return {"what": "generate", "side": "ours", "dtype": dtype, "attention": attention, "error": str(exc)}
    params = GenerationParams(prompt=PROMPT, steps=a.steps, guidance_scale=7.0, seed=0, sampler="DPM++ 2M",
                              width=a.size, height=a.size)
    sec, image = _timed(lambda: generate(m, params, preview_every=0).images[0], a.runs)
    row = {"what": "generate", "side": "ours", "dtype": dtype, "attention": m.attention_reason, "s_per_image": sec,
           "peak_gib": _peak_gib()}
    return row | {"_image": image}


def lora_in_generate(model: str, files: list, a) -> dict:
    """The trained LoRA through the Generate path at fp16: its diffusers file and its kohya file must draw the same
    image, and a different one from the base model."""
    from sd_demo.generate import GenerationParams, generate
    from sd_demo.models import load_model

    _free()
    m = load_model(model, device=a.device, dtype="fp32" if a.tiny else "fp16")
    params = GenerationParams(prompt="a circle number 1", steps=a.steps, guidance_scale=7.0, seed=0,
                              sampler="DPM++ 2M", width=a.size, height=a.size)
    images = {}
    for name, path in [("base", None)] + [(Path(f).name, str(f)) for f in files if str(f).endswith(".safetensors")]:
        m.set_loras([(path, 4.0)] if path else [])  # scale 4: 20 steps of a random-weight LoRA barely move it
        images[name] = np.asarray(generate(m, params, preview_every=0).images[0]).astype(int)
    base, *loras = images.values()
    return {"what": "lora in generate", "dtype": "fp32" if a.tiny else "fp16",
            "finite": all(np.isfinite(x).all() for x in images.values()),
            "max_diff_diffusers_vs_kohya": int(np.abs(loras[0] - loras[1]).max()),
            "mean_diff_vs_base": float(np.abs(loras[0] - base).mean())}


def train_run(model: str, data: str, a, method: str, precision: str, checkpointing: bool, compile: bool,
              steps: int) -> dict:
    from sd_demo.train import loop
    from sd_demo.train.config import TrainConfig

    _free()
    optimizers = []
    make_optimizer = loop.make_optimizer

    def spy(*args, **kw):  # records which optimizer the run chose
        opt = make_optimizer(*args, **kw)
        optimizers.append(type(opt).__module__ + "." + type(opt).__name__)
        return opt
    loop.make_optimizer = spy
    stamps = []
    extra = {"trigger": "<tok>", "init_word": "circle", "lr": 5e-3} if method == "textual-inversion" else {}
    cfg = TrainConfig(method=method, model=model, data=data, out=tempfile.mkdtemp(), steps=steps,
                      resolution=a.size, batch=2, rank=8, alpha=8, seed=0, overwrite=True,
                      mixed_precision=precision, gradient_checkpointing=checkpointing, compile=compile,
                      **({"lr": 1e-4} | extra))
    row = {"what": "train", "method": method, "precision": precision, "checkpointing": checkpointing,
           "compile": compile}
    try:
        result = loop.train(cfg, on_event=lambda ev: stamps.append(time.perf_counter()))
    except Exception as exc:  # noqa: BLE001  (a GPU-only failure is the finding; measure the rest)
        return row | {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        loop.make_optimizer = make_optimizer
    steps_s = np.diff(stamps)[3:] if len(stamps) > 5 else np.diff(stamps)
    return row | {"s_per_step": float(np.median(steps_s)), "peak_gib": _peak_gib(),
                  "optimizer": optimizers[0] if optimizers else "?",
                  "losses_finite": all(math.isfinite(x) for x in result.losses),
                  "first_last_loss": [result.losses[0], result.losses[-1]],
                  "files": sorted(p.name for p in result.files), "_paths": result.files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="write all rows here as JSON")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny SD 1.x on the CPU: checks this script, times nothing")
    ap.add_argument("--train", nargs="*", help="METHOD:PRECISION[:gc][:compile] runs (default: a set of each)")
    ap.add_argument("--skip-generate", action="store_true")
    a = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp())
    if a.tiny:
        from tests.tiny_models import build_tiny_sd

        a.device, a.size = "cpu", 64
        model = str(build_tiny_sd("sd15", tmp / "tiny"))
    else:
        from benchmarks.sd15 import build_sd15

        a.device = "cuda"
        print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
        t = time.perf_counter()
        model = build_sd15(tmp, device="cuda")
        print(f"# built a random SD 1.5-sized model in {time.perf_counter() - t:.0f} s", flush=True)
    rows = [] if a.skip_generate else [gen_stock(model, a)]
    variants = [("fp32", "sdpa")] if a.tiny else [("fp16", "sdpa"), ("fp16", "xformers"), ("bf16", "sdpa"),
                                                   ("fp32", "sdpa"), ("fp16", "auto")]
    for dtype, attention in [] if a.skip_generate else variants:
        rows.append(gen_ours(model, a, dtype, attention))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}), flush=True)
    for r in rows[1:]:
        if "_image" in r and r["dtype"] == rows[0]["dtype"]:
            r["max_pixel_diff_vs_stock"] = int(np.abs(r["_image"].astype(int) - rows[0]["_image"].astype(int)).max())
    runs = a.train if a.train is not None else (
        ["lora:no", "full:no:gc", "textual-inversion:no"] if a.tiny else
        ["lora:no", "lora:fp16", "lora:bf16", "lora:fp16:gc", "full:fp16:gc", "full:bf16", "textual-inversion:fp16"])
    if runs:
        from benchmarks.train import (
            make_data,  # the CPU training benchmark's images and captions
        )

        make_data(tmp / "data", 8, a.size)
    data = str(tmp / "data")
    for spec in runs:
        method, precision, *flags = spec.split(":")
        steps = a.train_steps if method == "lora" else max(10, a.train_steps // 2)
        rows.append(train_run(model, data, a, method, precision, "gc" in flags, "compile" in flags, steps))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}), flush=True)
        if method == "lora" and "files" in rows[-1] and not a.skip_generate:
            rows.append(lora_in_generate(model, rows[-1].pop("_paths"), a))
            print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("_")}), flush=True)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    for r in clean:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
