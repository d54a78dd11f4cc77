"""A tiny VAE (diffusers' ``AutoencoderTiny``, TAESD's architecture) for the embedded model, distilled from its
AutoencoderKL with our own code: ``python -m sd_demo.shapes train-tiny-vae --model DIR`` (a copy of the model).

It reads and writes the model's *scaled* latents, as TAESD does for SD (``scaling_factor`` 1), so the Fast choice
can decode with it where it would use TAESD on a Hub model. Like TAESD, the decoder learns to draw what the KL
decoder draws, on the latents it will be given: the model's own generations (between palette colours, say) as
well as the KL encoder's latents with noise. Trained on the pictures instead, it snapped a generation's
in-between orange to yellow and lost 4 of 16 held-out images. The encoder learns the KL encoder's latents. The
result is saved, atomically, as ``<model>/tiny_vae`` (models.TINY_VAE_DIR).

Not shipped yet: 2000 steps (16 min here, without the object weighting) drew rounder corners and lost 15 points of
shape accuracy on held-out prompts (80 -> 64 %), which the Fast choice may not cost. More steps are the next try."""
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

from .train import IMAGE_SIZE, make_dataset, swap_in, to_tensor

CHANNELS = 32  # TAESD has 64; 32 draws flat-colour scenes as well and decodes 128 px in ~13 ms here (KL: ~19)


def make_tiny_vae():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(CHANNELS,) * 4, decoder_block_out_channels=(CHANNELS,) * 4,
                           latent_channels=4, scaling_factor=1.0)


@torch.no_grad()
def generated_latents(pipe, model: Path, n: int, seed: int, batch: int = 16) -> torch.Tensor:
    """(n, 4, 16, 16) scaled latents the model (``pipe``, loaded from ``model``) generates for train-split
    captions, at its card's CFG and steps."""
    from ..models import card_settings
    from .captions import caption
    from .world import sample_scenes

    guidance, _, steps = card_settings(Path(model))
    prompts = [caption(s) for s in sample_scenes(n, seed + 11, "train")]
    out = [pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed + i)).images for i in range(0, n, batch)]
    return torch.cat(out)


@torch.no_grad()
def check(tiny, vae, latents: torch.Tensor) -> float:
    """Mean absolute difference (0..255) between the tiny and the KL decoder's pictures of scaled ``latents``."""
    ours = tiny.decode(latents).sample.clamp(-1, 1)
    theirs = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    return float((ours - theirs).abs().mean() * 127.5)


@torch.no_grad()
def kl_pictures(vae, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The KL decoder's pictures (N, 3, 128, 128) of scaled latents, in fp16 to halve the memory."""
    scale = vae.config.scaling_factor
    return torch.cat([vae.decode(latents[i:i + batch] / scale).sample.half() for i in range(0, len(latents), batch)])


def train(model: Path, steps: int = 2000, batch: int = 8, lr: float = 2e-3, noise: float = 0.3,
          scenes: int = 1500, generated: int = 512, object_weight: float = 4.0, seed: int = 0, log_every: int = 100):
    """Distil a tiny VAE from ``model``'s VAE; returns it (eval mode). The decoder's inputs: the model's own
    generations, and rendered train-split scenes' latents plus noise of std up to ``noise`` (scaled latents have
    std ~1); its target: the KL decoder's picture of those very latents. Whole pictures, not crops: the KL
    decoder's GroupNorm reads the whole picture, so a crop decodes to other colours (5-25 / 255 on average here)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae.eval().requires_grad_(False)  # the same weights the generations decode with: loaded once
    scale = float(vae.config.scaling_factor)
    own = generated_latents(pipe, model, generated, seed)
    held_out, own = own[:min(32, len(own) // 2)], own[min(32, len(own) // 2):]
    _, images = make_dataset(scenes, seed + 7)
    x = to_tensor(images)  # (N, 3, 128, 128)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)]) * scale
    zin = torch.cat([own, z + noise * torch.rand(len(z), 1, 1, 1) * torch.randn_like(z)])
    target = kl_pictures(vae, zin)
    tiny = make_tiny_vae().train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0, avg = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:  # warm-up, then cosine to 5 %
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        i, j = rng.integers(len(zin), size=batch), rng.integers(len(x), size=batch)
        rec, want = tiny.decode(zin[i]).sample, target[i].float()
        # the object's pixels (far from the picture's median, its background) weigh more: a blurred corner costs
        # few pixels but turns a triangle into a blob (object_weight 0: 64 % of shapes right, against 80 % by KL)
        background = want.flatten(2).median(2).values[..., None, None]
        w = 1 + object_weight * (want - background).abs().amax(1, keepdim=True).gt(0.2)
        err = rec - want
        loss = ((err.abs() + err.square()) * w).mean() + F.mse_loss(tiny.encode(x[j]).latents, z[j])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {avg:.4f} {(time.time() - t0) / (step + 1):.2f} s/step", flush=True)
    tiny.eval()
    print(f"mean abs difference from the KL decoder on {len(held_out)} held-out generations (0..255): "
          f"{check(tiny, vae, held_out):.2f}", flush=True)
    return tiny


def save(tiny, folder: Path) -> Path:
    """Write fp16 safetensors to a temporary sibling, then swap it in for ``folder`` (train.swap_in)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("block_out_channels", None)  # diffusers saves it and then warns on load that it is not expected
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return swap_in(tmp, folder)


def main(argv: list[str] | None = None) -> None:
    from ..models import TINY_VAE_DIR

    parser = argparse.ArgumentParser(prog="python -m sd_demo.shapes train-tiny-vae", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the embedded model's folder (its vae/ is read)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--scenes", type=int, default=1500, help="rendered train-split scenes")
    parser.add_argument("--generated", type=int, default=512, help="the model's own generations (32 held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.model / "vae" / "config.json").is_file():
        parser.error(f"--model: {args.model} has no vae/config.json; give a diffusers model folder")
    torch.set_num_threads(args.threads)
    tiny = train(args.model, steps=args.steps, scenes=args.scenes, generated=args.generated, seed=args.seed)
    print(f"saved {save(tiny, args.model / TINY_VAE_DIR)} ({IMAGE_SIZE} px scenes)")
