"""Our LoRA training step vs a stock recipe written the way diffusers' train_text_to_image_lora example does it.

    python benchmarks/train.py [--model DIR | --sd15] [--steps 40] [--warmup 5] [--resolution 64] [--batch 2]
                               [--images 16] [--compile]

Stock: every step loads and transforms the images, runs the VAE encoder and the text encoder, then the UNet.
Ours: ``sd_demo.train.loop.train`` (latents and text embeddings cached once). Same model, data, LoRA config
(rank 8 on to_q/k/v/out), batch, resolution, lr and step count. Each side runs in its own child process so its peak
RSS is its own. Prints s/step (steady state, after the first --warmup steps), total wall time including one-off
caching, peak RSS, and the mean loss of the last half of the run for both (the curves should match in level).
Without --model a tiny random SD 1.x model is built in a temp dir; ``--sd15`` builds one with SD 1.5's architecture
and random weights (``benchmarks/sd15.py``), the size people train LoRAs on. ``--compile`` adds a third side, ours
with ``--compile`` (torch.compile of the UNet): its steady state excludes the compile, which its wall time shows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.rss import peak_rss_mb  # noqa: E402  (after the path: run as a script too)


def make_data(folder: Path, n: int, res: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(215, 25, 35), (30, 160, 60), (25, 75, 235), (250, 230, 40)]
    for i in range(n):
        img = Image.new("RGB", (res, res), colours[(i + 1) % 4])
        ImageDraw.Draw(img).ellipse([res // 4, res // 4, 3 * res // 4, 3 * res // 4], fill=colours[i % 4])
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a circle number {i % 4}")


def run_ours(a, compile: bool = False) -> dict:
    from sd_demo.train.config import TrainConfig
    from sd_demo.train.loop import train

    stamps = []
    t0 = time.perf_counter()
    # the stock recipe pinned, so that no model's preset (the embedded one's preservation rows, trigger token,
    # loss weighting) changes what a step does
    cfg = TrainConfig(method="lora", model=a.model, data=a.data, out=tempfile.mkdtemp(), steps=a.steps,
                      resolution=a.resolution, batch=a.batch, rank=8, alpha=8, lr=1e-4, seed=0, overwrite=True,
                      compile=compile, target_modules="to_q,to_k,to_v,to_out.0", snr_gamma=0, preserve=0,
                      trigger_token=False, mixed_precision="no", gradient_checkpointing=False, validation_every=0)
    result = train(cfg, on_event=lambda ev: stamps.append(time.perf_counter()))
    return {"stamps": stamps, "wall": time.perf_counter() - t0, "losses": result.losses}


def run_stock(a) -> dict:
    """The diffusers example's inner loop, condensed: nothing is cached between steps."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image

    t0 = time.perf_counter()
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, torch_dtype=torch.float32)
    vae, te, tok, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    for m in (vae, te, unet):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    files = sorted(Path(a.data).glob("*.png"))
    rng = np.random.default_rng(0)
    stamps, losses = [], []
    for step in range(a.steps):
        batch = [files[i] for i in rng.choice(len(files), a.batch, replace=False)]
        imgs = [Image.open(f).convert("RGB").resize((a.resolution, a.resolution)) for f in batch]
        pixels = torch.stack([torch.from_numpy(np.asarray(i, np.float32) / 127.5 - 1).permute(2, 0, 1) for i in imgs])
        captions = [f.with_suffix(".txt").read_text() for f in batch]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            emb = te(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(noise_sched.add_noise(latents, noise, t), t, emb).sample
        # the example's target: the noise, or the velocity for a v-prediction model (the embedded one)
        target = (noise_sched.get_velocity(latents, noise, t)
                  if noise_sched.config.prediction_type == "v_prediction" else noise)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        stamps.append(time.perf_counter())
    return {"stamps": stamps, "wall": time.perf_counter() - t0, "losses": losses}


def measure(side: str, model: str, data: Path, steps: int, resolution: int, batch: int) -> dict:
    """One side's run in a child process of its own (its peak RSS is its own): step time stamps, wall time, losses,
    peak RSS."""
    out = Path(tempfile.mkdtemp()) / f"{side}.json"
    subprocess.run([sys.executable, __file__, "--side", side, "--model", model, "--data", str(data),
                    "--steps", str(steps), "--resolution", str(resolution), "--batch", str(batch),
                    "--out", str(out)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.read_text())


def per_step(result: dict, warmup: int) -> float:
    """Steady-state seconds a step: the stamps after the first ``warmup`` steps."""
    st = result["stamps"][warmup:]
    return (st[-1] - st[0]) / (len(st) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    which = ap.add_mutually_exclusive_group()  # without either: a tiny random SD 1.x
    which.add_argument("--model")
    which.add_argument("--sd15", action="store_true", help="build an SD 1.5-sized random model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the steady-state s/step")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="also time ours with --compile")
    ap.add_argument("--side", choices=["ours", "stock", "ours-compiled"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        res = run_stock(a) if a.side == "stock" else run_ours(a, compile=a.side == "ours-compiled")
        res["peak_rss_mb"] = peak_rss_mb()
        Path(a.out).write_text(json.dumps(res))
        return
    tmp = Path(tempfile.mkdtemp())
    if a.sd15:
        from benchmarks.sd15 import build_sd15

        a.model = build_sd15(tmp)
    elif not a.model:
        from tests.tiny_models import build_tiny_sd

        a.model = str(build_tiny_sd("sd15", tmp / "tiny-sd15"))
    make_data(tmp / "data", a.images, a.resolution)
    results = {side: measure(side, a.model, tmp / "data", a.steps, a.resolution, a.batch)
               for side in ("stock", "ours") + (("ours-compiled",) if a.compile else ())}
    print(f"model: {a.model}\n{a.resolution}px, batch {a.batch}, {a.steps} steps, {a.images} images, LoRA rank 8")
    print(f"{'':14}{'s/step':>10}{'wall s':>9}{'peak RSS MB':>13}{'mean loss (2nd half)':>22}")
    per = {}
    for side, r in results.items():
        per[side] = per_step(r, a.warmup)
        half = r["losses"][len(r["losses"]) // 2:]
        print(f"{side:14}{per[side]:>10.4f}{r['wall']:>9.1f}{r['peak_rss_mb']:>13.0f}{sum(half) / len(half):>22.4f}")
    print(f"speed-up stock/ours per step: {per['stock'] / per['ours']:.2f}x   "
          f"peak RSS ours/stock: {results['ours']['peak_rss_mb'] / results['stock']['peak_rss_mb']:.2f}")
    if "ours-compiled" in per:
        print(f"speed-up stock/ours-compiled per step: {per['stock'] / per['ours-compiled']:.2f}x")


if __name__ == "__main__":
    main()
