"""Pixel measurements of a shapes image: background colour, the object's mask, colour, centroid, extent and outline.

Plain numpy/scipy, no learned models, so the yardstick cannot share a model's blind spots. Everything is measured
on a copy resized to WORK_SIZE, so thresholds are in fractions of the side and hold for any input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

WORK_SIZE = 128
SMOOTH_SIGMA = 1.0  # px at WORK_SIZE: tames noise (sigma 8/255 -> ~2/255) but keeps a small star's points
BORDER_PX = 3  # frame whose median is the background colour
SEED_DISTANCE = 40.0  # RGB distance from the background that surely is object: > 4 sigma of smoothed noise,
#                       < half the closest palette pair (112)
MIN_AREA = 0.004  # of the image: smaller blobs are specks, not objects (a small triangle covers ~1.3 %)
N_RAYS = 180  # outline samples; resolves the 5th harmonic (a star) with room to spare
RAY_STEP = 0.25  # px along each ray; the 0.5-crossing is interpolated between steps
N_HARMONICS = 10


@dataclass(frozen=True)
class ObjectMeasure:
    background_rgb: tuple[float, float, float]
    found: bool
    object_rgb: tuple[float, float, float] | None = None
    area: float = 0.0  # mask area / image area
    centroid: tuple[float, float] = (0.5, 0.5)  # (x, y) as fractions of width and height, y down
    radius: float = 0.0  # largest centre-to-outline distance / side: the circumradius for every shape
    harmonics: tuple[float, ...] = ()  # |c_k| / mean radius of the outline r(theta), k = 0..N_HARMONICS
    solidity: float = 1.0  # outline area / its convex hull's area (star, cross << 1)
    n_blobs: int = 0  # separate blobs above MIN_AREA (1 for a single-object scene)


def to_array(image) -> np.ndarray:
    """(WORK_SIZE, WORK_SIZE, 3) float64 in 0..255 from a PIL image or an HxW[x3|x4] array (uint8, or float 0..1)."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype.kind == "f" and arr.max() <= 1.0:
            arr = arr * 255.0
        pil = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if min(pil.size) < 32:
        raise ValueError(f"image too small to judge ({pil.size[0]}x{pil.size[1]} px; use 64 px or more)")
    if pil.size != (WORK_SIZE, WORK_SIZE):
        pil = pil.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)  # Pillow's bilinear antialiases
    return np.asarray(pil, dtype=np.float64)


def measure(image) -> ObjectMeasure:
    """Find the largest object and measure it; ``found`` is False on a (near) flat image."""
    smooth = ndimage.gaussian_filter(to_array(image), sigma=(SMOOTH_SIGMA, SMOOTH_SIGMA, 0))
    bg = _border_median(smooth)
    seed, n_blobs = _seed_blob(np.linalg.norm(smooth - bg, axis=-1))
    if seed is None:
        return ObjectMeasure(_floats(bg), found=False)
    obj = _object_colour(smooth, bg, seed)
    # t = 0 on background, 1 on the object colour; t = 0.5 is the edge, also under blur (half-way in colour).
    direction = obj - bg
    t = np.clip((smooth - bg) @ direction / max(direction @ direction, 1e-6), 0.0, 1.0)
    mask = _mask_around(t > 0.5, seed)
    if mask.sum() < MIN_AREA * mask.size:
        return ObjectMeasure(_floats(bg), found=False)
    soft = t * ndimage.binary_dilation(mask, iterations=2)  # the object's own soft edge, other blobs cut off
    cy, cx = ndimage.center_of_mass(mask)
    centre = (cx + 0.5, cy + 0.5)  # pixel i covers [i, i + 1)
    profile = _radial_profile(soft, centre)
    return ObjectMeasure(
        background_rgb=_floats(bg), found=True, object_rgb=_floats(obj),
        area=float(mask.mean()),
        centroid=(centre[0] / mask.shape[1], centre[1] / mask.shape[0]),
        radius=float(profile.max() / WORK_SIZE),
        harmonics=_harmonics(profile),
        solidity=_solidity(profile),
        n_blobs=n_blobs,
    )


def _floats(rgb: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in rgb)


def _border_median(img: np.ndarray) -> np.ndarray:
    b = BORDER_PX
    frame = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                            img[b:-b, :b].reshape(-1, 3), img[b:-b, -b:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def _seed_blob(distance: np.ndarray) -> tuple[np.ndarray | None, int]:
    """The largest region clearly unlike the background, and how many such regions are object-sized."""
    labels, n = ndimage.label(distance > SEED_DISTANCE)
    if n == 0:
        return None, 0
    areas = np.bincount(labels.ravel())[1:]
    big = int((areas >= MIN_AREA * distance.size).sum())
    if big == 0:
        return None, 0
    return labels == (np.argmax(areas) + 1), big


def _object_colour(img: np.ndarray, bg: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Median colour of the blob's core (its pixels farthest from the background), free of blurred edges."""
    distance = np.linalg.norm(img[seed] - bg, axis=-1)
    core = distance >= 0.85 * np.percentile(distance, 90)
    return np.median(img[seed][core], axis=0)


def _mask_around(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The component of ``mask`` that overlaps the seed most, holes filled."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    overlap = np.bincount(labels[seed], minlength=n + 1)
    overlap[0] = 0
    return ndimage.binary_fill_holes(labels == np.argmax(overlap))


def _radial_profile(soft: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """r(theta): distance from the centre to the outermost 0.5-crossing of ``soft`` along N_RAYS rays, sub-pixel."""
    theta = np.linspace(0, 2 * np.pi, N_RAYS, endpoint=False)
    radii = np.arange(0, soft.shape[0] * 0.75, RAY_STEP)  # (R,)
    xs = centre[0] + np.cos(theta)[:, None] * radii - 0.5  # (N_RAYS, R), back to pixel-index coordinates
    ys = centre[1] + np.sin(theta)[:, None] * radii - 0.5
    values = ndimage.map_coordinates(soft, [ys, xs], order=1, mode="constant", cval=0.0)  # (N_RAYS, R)
    inside = values > 0.5
    last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)  # last inside sample per ray
    last = np.where(inside.any(axis=1), last, 0)
    nxt = np.minimum(last + 1, inside.shape[1] - 1)
    v0 = values[np.arange(N_RAYS), last]
    v1 = values[np.arange(N_RAYS), nxt]
    frac = np.clip((v0 - 0.5) / np.maximum(v0 - v1, 1e-6), 0.0, 1.0)
    return radii[last] + frac * RAY_STEP


def _harmonics(profile: np.ndarray) -> tuple[float, ...]:
    """Relative amplitude of each angular harmonic of r(theta): a k-fold shape peaks at k (and its multiples)."""
    spectrum = np.abs(np.fft.rfft(profile)) / len(profile)
    rel = 2 * spectrum / max(spectrum[0], 1e-6)
    rel[0] = 1.0
    return tuple(float(v) for v in rel[: N_HARMONICS + 1])


def _solidity(profile: np.ndarray) -> float:
    theta = np.linspace(0, 2 * np.pi, len(profile), endpoint=False)
    pts = np.stack([profile * np.cos(theta), profile * np.sin(theta)], axis=1)
    area = 0.5 * abs(np.dot(pts[:, 0], np.roll(pts[:, 1], -1)) - np.dot(pts[:, 1], np.roll(pts[:, 0], -1)))
    try:
        hull = ConvexHull(pts).volume  # in 2-D, .volume is the area
    except QhullError:
        return 1.0
    return float(area / hull) if hull > 0 else 1.0
