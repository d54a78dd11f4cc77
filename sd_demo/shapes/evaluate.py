"""Does an image obey its prompt? A pixel-analysis judge for the shapes world (no neural nets).

``detect`` names what is in the image (background, object colour, shape, size, position); ``evaluate`` compares it
with what a prompt asks for; ``evaluate_set`` + ``format_table`` give per-attribute accuracy as a markdown table.

Shape is read from the outline r(theta) seen from the object's centroid: its angular harmonics peak at k = 3 for a
triangle, 4 for a square or cross, 5 for a star, and are flat for a circle; solidity splits square from cross.
These features are rotation-invariant and degrade gracefully under blur (see ``python -m sd_demo.shapes``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

import numpy as np

from .captions import parse_prompt
from .pixels import ObjectMeasure, measure
from .vocab import ATTRIBUTES, PALETTE, POSITION_STEP, Color, Position, PromptSpec, Shape, Size

NO_OBJECT = "no object found"

# Decision lines, each half-way between the classes as measured on rendered scenes (clean to blur 3 px + noise 20):
SIZE_SPLIT = 0.135  # measured radius: small 0.07-0.11, large 0.15-0.23 (blur erodes star and triangle tips)
POSITION_SPLIT = POSITION_STEP / 2  # centroid offset from the middle; objects sit at 0 or +-0.25 (+-0.015 jitter)
CIRCLE_MAX_HARMONIC = 0.05  # circles: every harmonic 1..10 below ~0.025; the weakest k-fold peak (small blurred
#                              star) ~0.15 at blur 1.5
PEAK_DOMINANCE = 2.0  # the k-fold peak must beat every unrelated harmonic by this factor, else the shape is unclear
CROSS_MAX_SOLIDITY = 0.94  # cross 0.77-0.88, square >= 0.99 at blur 1.5
SHAPE_BY_FOLD = {3: Shape.TRIANGLE, 4: Shape.SQUARE, 5: Shape.STAR}


@dataclass(frozen=True)
class Detection:
    """What the pixels show; object attributes are None when no object (or no clear shape) is found."""

    background: Color
    found: bool
    color: Color | None = None
    shape: Shape | None = None
    size: Size | None = None
    position: Position | None = None
    measure: ObjectMeasure | None = None
    message: str = ""  # NO_OBJECT for a flat image

    def value(self, name: str) -> Enum | None:
        return getattr(self, name)


@dataclass(frozen=True)
class AttributeResult:
    name: str
    asked: Enum
    detected: Enum | None
    ok: bool


@dataclass(frozen=True)
class EvalResult:
    spec: PromptSpec
    detection: Detection
    attributes: dict[str, AttributeResult]  # one per attribute the prompt asks for

    @property
    def ok(self) -> bool:
        """Every asked attribute matches (True for a prompt that asks nothing, if an object was found)."""
        return self.detection.found and all(a.ok for a in self.attributes.values())

    @property
    def matches(self) -> dict[str, bool]:
        return {name: a.ok for name, a in self.attributes.items()}

    def summary(self) -> str:
        """One line, e.g. "shape: star ok; color: red != orange" or "no object found (background: green ok)"."""
        parts = [f"{a.name}: {_name(a.asked)}" + (" ok" if a.ok else f" != {_name(a.detected)}")
                 for a in self.attributes.values()]
        text = "; ".join(parts)
        return f"{NO_OBJECT} ({text})" if not self.detection.found else text


def _name(value: Enum | None) -> str:
    return "none" if value is None else value.value


def nearest_color(rgb) -> Color:
    """The palette colour closest to ``rgb`` in RGB distance."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(PALETTE, key=lambda c: float(np.sum((np.asarray(PALETTE[c]) - rgb) ** 2)))


def classify_shape(harmonics: Sequence[float], solidity: float) -> Shape | None:
    """Shape from the outline's harmonics (k = 0..10) and solidity; None when no shape is clearly present."""
    h = np.asarray(harmonics)
    if h[1:].max() < CIRCLE_MAX_HARMONIC:
        return Shape.CIRCLE
    fold = max(SHAPE_BY_FOLD, key=lambda k: h[k])
    unrelated = [h[k] for k in range(1, len(h)) if k % fold != 0]
    if h[fold] < CIRCLE_MAX_HARMONIC or h[fold] < PEAK_DOMINANCE * max(unrelated):
        return None
    if fold == 4 and solidity < CROSS_MAX_SOLIDITY:
        return Shape.CROSS
    return SHAPE_BY_FOLD[fold]


def classify_position(x: float, y: float) -> Position:
    """Position from the centroid (fractions of width and height)."""
    dx, dy = x - 0.5, y - 0.5
    horizontal = "left" if dx < -POSITION_SPLIT else "right" if dx > POSITION_SPLIT else None
    vertical = "top" if dy < -POSITION_SPLIT else "bottom" if dy > POSITION_SPLIT else None
    return Position.from_parts(horizontal, vertical)


def detect(image) -> Detection:
    """Name the background and the largest object of an RGB image (PIL or HxWx3 array, 64 px or more)."""
    m = measure(image)
    background = nearest_color(m.background_rgb)
    if not m.found:
        return Detection(background, found=False, measure=m, message=NO_OBJECT)
    return Detection(
        background=background,
        found=True,
        color=nearest_color(m.object_rgb),
        shape=classify_shape(m.harmonics, m.solidity),
        size=Size.LARGE if m.radius > SIZE_SPLIT else Size.SMALL,
        position=classify_position(*m.centroid),
        measure=m,
    )


def evaluate(prompt: str | PromptSpec, image) -> EvalResult:
    """Compare an image with what ``prompt`` asks for; attributes the prompt leaves open are not judged."""
    return judge(prompt, detect(image))


def judge(prompt: str | PromptSpec, detection: Detection) -> EvalResult:
    """``evaluate`` on an existing detection (to check one image against many prompts without re-measuring)."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    attributes = {}
    for name, asked in spec.asked().items():
        detected = detection.value(name)
        attributes[name] = AttributeResult(name, asked, detected, detected == asked)
    return EvalResult(spec, detection, attributes)


# --- sets of images ----------------------------------------------------------------------------------------------

@dataclass
class Report:
    results: list[EvalResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def n_found(self) -> int:
        return sum(r.detection.found for r in self.results)

    def asked(self, name: str) -> int:
        return sum(name in r.attributes for r in self.results)

    def correct(self, name: str) -> int:
        return sum(r.attributes[name].ok for r in self.results if name in r.attributes)

    def accuracy(self, name: str) -> float | None:
        """Share of the images whose prompt asks for ``name`` that get it right; None if no prompt asks."""
        asked = self.asked(name)
        return self.correct(name) / asked if asked else None

    @property
    def all_correct(self) -> float:
        """Share of images that obey every attribute their prompt asks for."""
        return sum(r.ok for r in self.results) / self.n if self.n else 0.0


def evaluate_set(prompts: Iterable[str | PromptSpec], images: Iterable) -> Report:
    """Evaluate each image against its prompt (paired in order)."""
    prompts, images = list(prompts), list(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    return Report([evaluate(p, im) for p, im in zip(prompts, images)])


def format_table(report: Report) -> str:
    """Markdown table: accuracy per attribute, then all-attributes and object-found rates."""
    lines = ["| attribute | correct | asked | accuracy |", "|---|---:|---:|---:|"]
    for name in ATTRIBUTES:
        acc = report.accuracy(name)
        if acc is not None:
            lines.append(f"| {name} | {report.correct(name)} | {report.asked(name)} | {acc:.1%} |")
    n = report.n
    lines.append(f"| all asked attributes | {sum(r.ok for r in report.results)} | {n} | {report.all_correct:.1%} |")
    lines.append(f"| object found | {report.n_found} | {n} | {report.n_found / n if n else 0.0:.1%} |")
    return "\n".join(lines)
