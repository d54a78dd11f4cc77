"""Measure the evaluator on rendered scenes: clean, corrupted (blur + noise), and against mismatched prompts.

Shared by tests/test_shapes.py and ``python -m sd_demo.shapes`` so the numbers quoted are the numbers tested.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from .captions import CaptionStyle, caption
from .evaluate import Detection, Report, evaluate_set, judge
from .vocab import ATTRIBUTES, Color, Position, PromptSpec, Shape, Size
from .world import Scene, Split, render, sample_scenes

ATTRIBUTE_VALUES = {"shape": list(Shape), "color": list(Color), "background": list(Color), "size": list(Size),
                    "position": list(Position)}


@dataclass(frozen=True)
class Corruption:
    blur: float = 0.0  # Gaussian blur radius in px (PIL's radius is the standard deviation)
    noise: float = 0.0  # standard deviation of added Gaussian noise, 0..255 scale


CLEAN = Corruption()
MILD = Corruption(blur=1.5, noise=8.0)  # what the tests hold the evaluator to: a stand-in for a small model's soft,
#                                         noisy output


def corrupt(image: Image.Image, corruption: Corruption, seed: int = 0) -> Image.Image:
    """Blur then add seeded Gaussian noise, clipped to 0..255."""
    if corruption.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(corruption.blur))
    if corruption.noise <= 0:
        return image
    noise = np.random.default_rng(seed).normal(0.0, corruption.noise, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8))


def scene_images(n: int, seed: int, corruption: Corruption = CLEAN, split: Split | str = Split.ALL,
                 size: int = 128):
    """(scenes, images): ``n`` sampled scenes and their (corrupted) renders."""
    scenes = sample_scenes(n, seed, split)
    images = [corrupt(render(s, size), corruption, seed=seed * 100_003 + i) for i, s in enumerate(scenes)]
    return scenes, images


def ground_truth_report(n: int = 500, seed: int = 0, corruption: Corruption = CLEAN,
                        style: CaptionStyle = CaptionStyle.FULL, size: int = 128) -> Report:
    """Each render judged against its own caption: every attribute should match."""
    scenes, images = scene_images(n, seed, corruption, size=size)
    return evaluate_set([caption(s, style) for s in scenes], images)


def perturb(spec: PromptSpec, name: str, rng: np.random.Generator) -> PromptSpec:
    """``spec`` with attribute ``name`` swapped for another value (colour and background stay distinct)."""
    current = getattr(spec, name)
    forbidden = {current, spec.background if name == "color" else spec.color if name == "background" else None}
    options = [v for v in ATTRIBUTE_VALUES[name] if v not in forbidden]
    return replace(spec, **{name: options[rng.integers(len(options))]})


def mismatch_rate(scenes: list[Scene], detections: list[Detection], seed: int = 0,
                  names: tuple[str, ...] = ATTRIBUTES) -> dict[str, float]:
    """Per attribute: share of scenes judged against a prompt with just that attribute changed where the result
    flags exactly that attribute (and passes all the others)."""
    rng = np.random.default_rng(seed)
    rates = {}
    for name in names:
        hits = 0
        for scene, detection in zip(scenes, detections):
            result = judge(perturb(scene.spec(), name, rng), detection)
            hits += all(ok == (attr != name) for attr, ok in result.matches.items())
        rates[name] = hits / len(scenes)
    return rates
