"""A tiny VAE (diffusers' ``AutoencoderTiny``, TAESD's architecture) for the embedded model, distilled from its
AutoencoderKL with our own code: ``python -m sd_demo.shapes train-tiny-vae --model assets/shapes-sd``.

It reads and writes the model's *scaled* latents, as TAESD does for SD (``scaling_factor`` 1), so the Fast choice
can decode with it where it would use TAESD on a Hub model. Like TAESD, the decoder learns to draw what the KL
decoder draws, on the latents it will be given: the model's own generations (between palette colours, say) as
well as the KL encoder's latents with noise. Trained on the pictures instead, it snapped a generation's
in-between orange to yellow and lost 4 of 16 held-out images. The encoder learns the KL encoder's latents. Both
are fully convolutional, so they train on crops. The result is saved, atomically, as ``<model>/tiny_vae``
(models.TINY_VAE_DIR)."""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .train import IMAGE_SIZE, make_dataset, random_crops, to_tensor

CHANNELS = 32  # TAESD has 64; 32 draws flat-colour scenes as well and decodes 128 px in ~13 ms here (KL: ~19)


def make_tiny_vae():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(CHANNELS,) * 4, decoder_block_out_channels=(CHANNELS,) * 4,
                           latent_channels=4, scaling_factor=1.0)


@torch.no_grad()
def generated_latents(model: Path, n: int, seed: int, batch: int = 16) -> torch.Tensor:
    """(n, 4, 16, 16) scaled latents the model itself generates for train-split captions, at its card's CFG."""
    from diffusers import StableDiffusionPipeline

    from ..models import card_settings
    from .captions import caption
    from .world import sample_scenes

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guidance, _, steps = card_settings(Path(model))
    prompts = [caption(s) for s in sample_scenes(n, seed + 11, "train")]
    out = [pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed + i)).images for i in range(0, n, batch)]
    return torch.cat(out)


def latent_crops(latents: torch.Tensor, size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    idx = rng.integers(len(latents), size=n)
    y, x = rng.integers(0, latents.shape[-1] - size + 1, size=(2, n))
    return torch.stack([latents[i, :, a:a + size, b:b + size] for i, a, b in zip(idx, y, x)])


@torch.no_grad()
def check(tiny, vae, latents: torch.Tensor) -> float:
    """Mean absolute difference (0..255) between the tiny and the KL decoder's pictures of scaled ``latents``."""
    ours = tiny.decode(latents).sample.clamp(-1, 1)
    theirs = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return float((ours - theirs).abs().mean() * 127.5)


def train(model: Path, steps: int = 3000, batch: int = 16, crop: int = 64, lr: float = 2e-3, noise: float = 0.3,
          scenes: int = 4000, generated: int = 512, seed: int = 0, log_every: int = 100):
    """Distil a tiny VAE from ``model``'s VAE; returns it (eval mode). Each batch: half crops of the model's own
    generations, half of rendered train-split scenes' latents plus noise of std up to ``noise`` (scaled latents
    have std ~1); the target is the KL decoder's picture of the very latents the tiny decoder gets."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    own = generated_latents(model, generated, seed)
    held_out, own = own[:32], own[32:]
    scene_list, images = make_dataset(scenes, seed + 7)
    tiny = make_tiny_vae().train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0, avg, half = time.time(), None, batch // 2
    for step in range(steps):
        for g in opt.param_groups:  # warm-up, then cosine to 5 %
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = to_tensor(random_crops(images, scene_list, crop, half, rng))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * scale  # (B/2, 4, crop/8, crop/8), the UNet's space
            sigma = noise * torch.rand(half, 1, 1, 1)
            zin = torch.cat([z + sigma * torch.randn_like(z), latent_crops(own, crop // 8, batch - half, rng)])
            target = vae.decode(zin / scale).sample
        rec = tiny.decode(zin).sample
        loss = F.l1_loss(rec, target) + F.mse_loss(rec, target) + F.mse_loss(tiny.encode(x).latents, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {avg:.4f} {(time.time() - t0) / (step + 1):.2f} s/step", flush=True)
    tiny.eval()
    print(f"mean abs difference from the KL decoder on 32 held-out generations (0..255): "
          f"{check(tiny, vae, held_out):.2f}", flush=True)
    return tiny


def save(tiny, folder: Path) -> Path:
    """Write fp16 safetensors to a temporary sibling, then rename it over ``folder`` (never half-written)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("block_out_channels", None)  # diffusers saves it and then warns on load that it is not expected
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    from ..models import TINY_VAE_DIR

    parser = argparse.ArgumentParser(prog="python -m sd_demo.shapes train-tiny-vae", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the embedded model's folder (its vae/ is read)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.model / "vae" / "config.json").is_file():
        parser.error(f"--model: {args.model} has no vae/config.json; give a diffusers model folder")
    torch.set_num_threads(args.threads)
    tiny = train(args.model, steps=args.steps, seed=args.seed)
    print(f"saved {save(tiny, args.model / TINY_VAE_DIR)} ({IMAGE_SIZE} px scenes)")
