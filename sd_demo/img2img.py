"""Image to image, inpainting and hires fix: the image work around the denoising loop, done as A1111 does it.

An init image is fitted to the output size (A1111's resize modes, which diffusers' image processor implements), a
mask is blurred at its edge, "only masked" crops the masked area with padding and redraws it at the output size, and
the masked area starts from the original, a fill of its surroundings, latent noise or nothing. After decoding, the
result is pasted into the source through the blurred mask, so unmasked pixels are the source's own. The denoising
itself is diffusers' (generate.py); nothing here runs the UNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

# A1111's names -> diffusers' VaeImageProcessor.resize modes
RESIZE_MODES = {"Just resize": "default", "Crop and resize": "crop", "Resize and fill": "fill"}
MASKED_CONTENT = ("original", "fill", "latent noise", "latent nothing")
# A1111's hires upscalers: latent ones interpolate the latents (torch mode, antialias); image ones resize the decoded
# first pass with PIL and encode it again
HIRES_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (nearest)": ("nearest-exact", False),
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
MAX_SOURCE_PIXELS = 4096 * 4096  # a larger upload is refused, not resized (PIL's bomb guard stops at 179 MP)


def output_size(source: tuple[int, int], native: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Width x height for an init image: what the request gives; a missing side follows the source's aspect; with
    neither, the model's native area at the source's aspect (a 4:3 photo on SD 1.5 -> 592x440), multiples of 8."""
    w, h = source
    if width and height:
        return width, height
    if width or height:
        scale = (width or height) / (w if width else h)
    else:
        scale = native / math.sqrt(w * h)
    return width or max(8, round(w * scale / 8) * 8), height or max(8, round(h * scale / 8) * 8)


def check_size(image: Image.Image, name: str) -> None:
    """ValueError when the picture has more pixels than we take (read from its header: call it before decoding)."""
    if image.width * image.height > MAX_SOURCE_PIXELS:
        raise ValueError(f"{name}: {image.width}x{image.height} is too large; use at most {MAX_SOURCE_PIXELS // 10**6} "
                         "megapixels")


def check_source(image: Image.Image, name: str = "init_image") -> Image.Image:
    """The image as RGB (transparency over white), or ValueError naming what to change."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name}: give an image (PNG, JPEG or WebP)")
    check_size(image, name)
    if image.mode in ("RGBA", "LA", "P") and "A" in image.convert("RGBA").getbands():
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def check_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A mask as grey levels (white = redraw), at the source's size; ValueError when it is empty."""
    if not isinstance(mask, Image.Image):
        raise ValueError("mask: give an image (white where the picture is to be redrawn)")
    m = mask.convert("L")
    if m.size != size:
        m = m.resize(size, Image.Resampling.BILINEAR)
    if m.getextrema()[1] < 128:
        raise ValueError("mask: it marks nothing; paint the area to redraw in white, or leave the mask out for "
                         "image to image")
    return m


@dataclass
class Prepared:
    """What the denoising starts from, and how its result goes back into the source."""

    image: Image.Image  # RGB at the processing size (width x height): what is encoded
    mask: Image.Image | None  # L at the processing size, blurred: where the picture is redrawn
    source: Image.Image  # RGB: the picture the result is pasted into (the fitted init image, or the whole source)
    overlay: Image.Image | None  # L at the source's size: the blurred mask the result is pasted through
    crop: tuple[int, int, int, int] | None = None  # only masked: the source's box that was redrawn


def prepare(processor, init: Image.Image, mask: Image.Image | None, width: int, height: int, resize_mode: str,
            mask_blur: int, masked_content: str, only_masked: bool, padding: int) -> Prepared:
    """Fit, blur, crop and fill as A1111's img2img does. ``processor``: the pipeline's VaeImageProcessor."""
    mode = RESIZE_MODES[resize_mode]
    if mask is None:
        return Prepared(processor.resize(init, height, width, mode), None, init, None)
    blurred = mask.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else mask
    if only_masked:  # the source keeps its size; the box around the mask is redrawn at width x height
        crop = processor.get_crop_region(blurred, width, height, padding)
        image = init.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
        region = blurred.crop(crop).resize((width, height), Image.Resampling.BILINEAR)
        prepared = Prepared(image, region, init, blurred, crop)
    else:
        source = processor.resize(init, height, width, mode)
        region = processor.resize(blurred.convert("RGB"), height, width, mode).convert("L")
        prepared = Prepared(source, region, source, region)
    if masked_content == "fill":
        prepared.image = fill(prepared.image, prepared.mask)
    return prepared


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked area painted with its surroundings' colours (A1111's "fill"): each masked pixel takes the mean of
    the unmasked pixels near it, weighted by a Gaussian, from the widest blur to the narrowest that reaches it."""
    from scipy.ndimage import gaussian_filter

    rgb = np.asarray(image, dtype=np.float64) / 255.0  # (H, W, 3)
    hole = np.asarray(mask, dtype=np.float64) / 255.0 >= 0.5
    keep = (~hole).astype(np.float64)
    if not keep.any():
        return image  # nothing around the mask to take colours from
    out = rgb.copy()
    filled = np.zeros(hole.shape, bool)
    for sigma in (2, 8, 32, 128, max(image.size)):  # narrow first: the nearest colours win where they reach
        weight = gaussian_filter(keep, sigma)
        reach = hole & ~filled & (weight > 1e-3)
        if reach.any():
            for c in range(3):
                est = gaussian_filter(rgb[..., c] * keep, sigma) / np.maximum(weight, 1e-12)
                out[..., c][reach] = est[reach]
            filled |= reach
    return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8))


def latent_keep(mask: Image.Image, shape: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) 1 where the latents keep the source: the blurred mask at the latents' size, rounded (A1111)."""
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    m = F.interpolate(m, size=shape, mode="area")
    return 1.0 - m.round()


def start_latents(latents: torch.Tensor, keep: torch.Tensor, masked_content: str, noise: torch.Tensor) -> torch.Tensor:
    """The masked latents as the masked content says: "latent noise" replaces them with unit ``noise``, "latent
    nothing" with zeros; "original" and "fill" keep the encoded picture."""
    if masked_content == "latent noise":
        return latents * keep + noise.to(latents) * (1 - keep)
    if masked_content == "latent nothing":
        return latents * keep
    return latents


def paste_back(prepared: Prepared, images: list[Image.Image]) -> list[Image.Image]:
    """Each result in the source through the blurred mask (only masked: into the cropped box), so the unmasked
    pixels are the source's own; without a mask the results as they are."""
    if prepared.overlay is None:
        return images
    out = []
    for im in images:
        base = prepared.source.copy()
        if prepared.crop is not None:
            x1, y1, x2, y2 = prepared.crop
            base.paste(im.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        else:
            base = im
        out.append(Image.composite(base, prepared.source, prepared.overlay))
    return out


def hires_size(width: int, height: int, scale: float, target_w: int, target_h: int) -> tuple[int, int]:
    """The hires fix's second-pass size: the target (a missing side follows the aspect), else width x height times
    the factor, multiples of 8."""
    if target_w or target_h:
        w = target_w or max(8, round(width * target_h / height / 8) * 8)
        h = target_h or max(8, round(height * target_w / width / 8) * 8)
        return w, h
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


def upscale_latents(latents: torch.Tensor, shape: tuple[int, int], upscaler: str) -> torch.Tensor:
    """(B, 4, h, w) -> (B, 4, H, W) for a latent upscaler."""
    mode, antialias = HIRES_UPSCALERS[upscaler]
    return F.interpolate(latents, size=shape, mode=mode, antialias=antialias)


def is_latent_upscaler(upscaler: str) -> bool:
    return isinstance(HIRES_UPSCALERS[upscaler], tuple)


def pixel_resample(upscaler: str) -> Image.Resampling:
    """The PIL filter of an upscaler; a latent one's nearest kin where pixels must be enlarged instead (an
    inpainting checkpoint's hires fix)."""
    how = HIRES_UPSCALERS[upscaler]
    if not is_latent_upscaler(upscaler):
        return how
    return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}.get(
        how[0], Image.Resampling.NEAREST)


def mask_from_layers(layers: list) -> Image.Image | None:
    """A mask from an image editor's drawn layers: white wherever a stroke is (any colour, any opacity)."""
    strokes = [layer for layer in layers or [] if layer is not None]
    if not strokes:
        return None
    alpha = np.zeros((strokes[0].height, strokes[0].width), np.uint8)
    for layer in strokes:
        a = np.asarray(layer.convert("RGBA").getchannel("A"))
        alpha = np.maximum(alpha, a[:alpha.shape[0], :alpha.shape[1]])
    mask = Image.fromarray(np.where(alpha > 0, 255, 0).astype(np.uint8))
    return mask if mask.getextrema()[1] else None

