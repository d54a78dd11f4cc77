"""Examples to pixels and batches: aspect-ratio buckets, image loading and cropping, the dataset and the resumable
bucket batch sampler.

Size conventions (the two worlds meet here): ``Example.size`` and ``load_example``'s ``target`` are (width, height)
as PIL reports and takes them; buckets (``assign_buckets``, ``bucket_resolutions``, ``TrainDataset.bucket``) are
(height, width) as tensors are laid out: an image of bucket (h, w) becomes a tensor of shape (3, h, w).
Random crops and batch order derive from the file name and (seed, epoch), so a resumed run draws exactly what the
uninterrupted run would have.
"""
from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import IMAGE_FORMATS, DataConfig, DatasetReport, Example, orientation

# ---------------------------------------------------------------- buckets


def bucket_resolutions(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets, sides multiples of ``step``, area <= resolution² (kohya's rule: memory per batch
    never exceeds the square case), aspect ratio <= ``max_ratio``; sorted from tallest to widest."""
    area, out = resolution * resolution, set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step  # the tallest height that keeps w * h <= area
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw[0] * hw[1]))


def assign_buckets(sizes: list[tuple[int, int]], resolution: int) -> list[tuple[int, int]]:
    """(height, width) bucket per (width, height) size: the nearest aspect ratio in log space, larger area on ties."""
    buckets = bucket_resolutions(resolution)
    logs = [math.log(w / h) for h, w in buckets]

    def nearest(size: tuple[int, int]) -> tuple[int, int]:
        r = math.log(size[0] / size[1])
        j = min(range(len(buckets)), key=lambda k: (round(abs(logs[k] - r), 9), -buckets[k][0] * buckets[k][1]))
        return buckets[j]

    return [nearest(s) for s in sizes]


# ---------------------------------------------------------------- loading


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: scale to 8 bits, not clip to white
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # On white, not black: transparent PNGs (logos, cut-outs) are meant to be seen on a light page.
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(size: tuple[int, int], target: tuple[int, int], center: bool, rng: np.random.Generator
             ) -> tuple[tuple[int, int], int, int]:
    """((resized w, h), left, top): an image of ``size`` resized to cover ``target``, then cut at (left, top).
    Computed from the full-size dimensions, so a JPEG decoded in draft mode is cut exactly the same."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if center:
        return (nw, nh), (nw - tw) // 2, (nh - th) // 2
    return (nw, nh), int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))


def _crop_rng(ex: Example) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(ex.path.name.encode()))


def micro_conditioning(ex: Example, target: tuple[int, int], *, center_crop: bool = True, flip: bool = False
                       ) -> tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning for ``ex`` cut to ``target`` as ``load_example`` cuts it (seeded crop): (original
    height, width, crop top, crop left, target height, width). A flipped image's crop is measured from the other
    side, as in the diffusers SDXL training example."""
    (nw, _), left, top = crop_box(ex.size, target, center_crop, _crop_rng(ex))
    if flip:
        left = nw - target[0] - left
    return ex.size[1], ex.size[0], top, left, target[1], target[0]


def load_example(ex: Example, target: tuple[int, int], *, center_crop: bool = True, flip: bool = False,
                 rng: np.random.Generator | None = None) -> Image.Image:
    """RGB image of exactly ``target`` = (width, height): EXIF-oriented, alpha on white, resized to cover, cropped.

    ``flip`` applies a horizontal flip (the caller decides, so the decision can be seeded). Without ``rng`` a random
    crop uses a generator seeded from the file name, so reruns and resumes crop identically.
    """
    tw, th = target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # scan_dataset applied max_pixels
        with Image.open(ex.path, formats=IMAGE_FORMATS) as img:
            sw, sh = img.size
            if orientation(img) in (5, 6, 7, 8):
                sw, sh = sh, sw
            scale = max(tw / sw, th / sh)
            # JPEG only: decode at 1/2..1/8 scale when that still covers the target (big photos load ~10x faster).
            draft = (math.ceil(img.width * scale), math.ceil(img.height * scale))
            img.draft(None, draft)
            img = _to_rgb(ImageOps.exif_transpose(img))
    (nw, nh), left, top = crop_box((sw, sh), target, center_crop, _crop_rng(ex) if rng is None else rng)
    if img.size != (nw, nh):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    img = img.crop((left, top, left + tw, top + th))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range the SD VAE encoder expects."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


# ---------------------------------------------------------------- dataset and sampler


class TrainDataset:
    """The examples of a scanned report with their buckets (h, w). The loop caches each example's latents once;
    its per-step randomness (flips, caption dropout) comes from the loop's step generator."""

    def __init__(self, report: DatasetReport, cfg: DataConfig):
        self.report, self.cfg = report, cfg  # the report keeps an extracted zip's files alive
        self.examples = report.examples
        res = cfg.resolution
        self.buckets = (assign_buckets([e.size for e in self.examples], res) if cfg.buckets
                        else [(res, res)] * len(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    def bucket(self, i: int) -> tuple[int, int]:
        return self.buckets[i]


class BucketBatchSampler:
    """Index batches, each from one bucket; order from default_rng((seed, epoch)); resumable mid-epoch.

    ``position`` counts batches handed out: {"epoch": e, "position": n} is all ``load_state_dict`` needs besides
    the checks.
    Iterating after an epoch is used up starts the next one; ``set_epoch`` to the current epoch keeps the position
    (so "set_epoch at the top of every epoch" and resume work together).
    """

    def __init__(self, dataset, batch_size: int, seed: int, drop_last: bool = False):
        if int(batch_size) < 1 or int(seed) < 0:
            raise ValueError(f"batch size {batch_size} must be >= 1 and seed {seed} >= 0")
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, int(batch_size), int(seed), drop_last
        self._groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(dataset)):
            self._groups.setdefault(tuple(dataset.bucket(i)), []).append(i)
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise ValueError(f"batch size {batch_size} is larger than every bucket and drop_last is set; "
                             "lower the batch size or turn buckets off")

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size for g in self._groups.values())
        return full if self.drop_last else full + sum(bool(len(g) % self.batch_size) for g in self._groups.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in order (pure function of seed, epoch, batch size and the buckets)."""
        rng = np.random.default_rng((self.seed, int(epoch)))
        out = []
        for key in sorted(self._groups):  # sorted: dict order must not leak into the draws
            group = self._groups[key]
            shuffled = [group[j] for j in rng.permutation(len(group))]
            for k in range(0, len(shuffled), self.batch_size):
                chunk = shuffled[k:k + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        return [out[j] for j in rng.permutation(len(out))]

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __iter__(self):
        if self.position >= len(self):
            self.set_epoch(self.epoch + 1)
        batches = self.batches(self.epoch)
        for k in range(self.position, len(batches)):
            self.position = k + 1  # counted before the hand-out: a checkpoint taken after this batch skips it
            yield list(batches[k])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("seed", self.seed), ("batch_size", self.batch_size), ("num_examples", len(self.dataset))):
            if key in state and state[key] != now:
                raise ValueError(f"resume: the checkpoint's {key} is {state[key]}, this run has {now}; resume with "
                                 "the same data, seed and batch size (or start a new run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
