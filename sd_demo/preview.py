"""Cheap live previews: latents -> RGB by one linear map, no VAE decode.

Known fixed maps exist for the SD 1.x and SDXL VAEs only. We fit the map for whatever VAE is loaded instead, once,
by least squares between the latents of a few flat colour images and their RGB values: ~0.1 s for the SD VAE on
a CPU. It holds for VAEs near linear in colour, as SD's are; a small VAE far from it (the embedded model's) decodes
its previews itself (generate._previews).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Flat colours spanning the RGB cube (corners + greys): enough to fix a 4x3 matrix and a bias.
_COLOURS = [(r, g, b) for r in (0, 1) for g in (0, 1) for b in (0, 1)] + [(0.5, 0.5, 0.5), (0.25, 0.5, 0.75)]


@torch.no_grad()
def fit_preview_map(vae, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return (W, b) with rgb ≈ latent @ W + b, for latents in the UNet's (scaled) space."""
    p = next(vae.parameters())
    rgb = torch.tensor(_COLOURS, dtype=torch.float32)  # (K, 3) in [0, 1]
    images = (rgb * 2 - 1)[:, :, None, None].expand(-1, -1, size, size)  # (K, 3, S, S) in [-1, 1]
    latents = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean.float()  # (K, C, S/8, S/8)
    z = latents.mean(dim=(2, 3)) * vae.config.scaling_factor  # (K, C)
    a = torch.cat([z, torch.ones(len(z), 1)], dim=1).cpu()
    sol = torch.linalg.lstsq(a, rgb).solution  # (C+1, 3)
    return sol[:-1].numpy(), sol[-1].numpy()


def latents_to_preview(latents: torch.Tensor, wb: tuple[np.ndarray, np.ndarray], scale: int = 4) -> list[Image.Image]:
    """(B, C, h, w) latents -> B small RGB images (h*scale x w*scale)."""
    w, b = wb
    z = latents.detach().float().cpu().permute(0, 2, 3, 1).numpy()  # (B, h, w, C)
    rgb = np.clip(z @ w + b, 0, 1)
    out = []
    for img in (rgb * 255).round().astype(np.uint8):
        pil = Image.fromarray(img)
        out.append(pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST))
    return out
