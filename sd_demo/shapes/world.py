"""The shapes world: seeded scenes of one coloured shape on a plain background, their split and their pixels.

A ``Scene`` carries exact labels (shape, colour, size, position, background) plus the jitter drawn from the seed
(small shifts, scale and rotation), so ``render(scene)`` is a pure function and labels never drift from pixels.

Train / held-out split: a (shape, colour, background) triple is held out iff
``(shape.index + colour.index + background.index) % 8 == 0`` (indices = enum order in ``vocab``). For any fixed
pair of the three, the third runs over >= 5 distinct indices, so at most one of its values is held out: every
shape, colour, background and every pair of them is still seen in training, only the triple is new. With the
default vocabulary 34 of the 280 triples (12 %) are held out. Size and position are not split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

# Re-exported so the world's text side is importable from here too.
from .captions import CaptionStyle, caption, parse_prompt, random_caption  # noqa: F401
from .vocab import ATTRIBUTES, PALETTE, Color, Position, PromptSpec, Shape, Size  # noqa: F401

HELD_OUT_MODULUS = 8

# Largest rotation (degrees, either way) per shape: well inside each shape's symmetry so a square never becomes a
# diamond and a triangle or star always points roughly up.
MAX_ROTATION: dict[Shape, float] = {
    Shape.CIRCLE: 0.0, Shape.SQUARE: 20.0, Shape.TRIANGLE: 20.0, Shape.STAR: 15.0, Shape.CROSS: 20.0,
}
STAR_INNER_RATIO = 0.5  # fatter than a pentagram (0.38) so a small star keeps its points at 128 px
CROSS_ARM_RATIO = 0.36  # arm half-width / arm length of the plus sign


class Split(str, Enum):
    TRAIN = "train"
    HELD_OUT = "heldout"
    ALL = "all"

    @classmethod
    def _missing_(cls, value):
        # Accept "held_out" / "held-out" / any case as well.
        text = str(value).lower().replace("_", "").replace("-", "")
        return next((m for m in cls if m.value == text), None)


@dataclass(frozen=True)
class WorldConfig:
    shapes: tuple[Shape, ...] = tuple(Shape)  # what sample_scenes / all_combinations draw from
    colors: tuple[Color, ...] = tuple(Color)  # object and background colours (never equal within a scene)
    sizes: tuple[Size, ...] = tuple(Size)
    positions: tuple[Position, ...] = tuple(Position)
    position_jitter: float = 0.015  # +- fraction of the side (2 px at 128): variety without blurring the labels
    scale_jitter: float = 0.10  # +- relative radius: sizes stay >= 1.6x apart
    rotate: bool = True  # rotate square / triangle / star / cross within MAX_ROTATION


DEFAULT_CONFIG = WorldConfig()


@dataclass(frozen=True)
class Obj:
    shape: Shape
    color: Color
    size: Size = Size.LARGE
    position: Position = Position.CENTER
    dx: float = 0.0  # jitter of the centre, fraction of the side
    dy: float = 0.0
    scale: float = 1.0  # jitter of the radius, relative
    rotation: float = 0.0  # degrees, counter-clockwise on screen

    @property
    def center(self) -> tuple[float, float]:
        ox, oy = self.position.offset
        return 0.5 + ox + self.dx, 0.5 + oy + self.dy

    @property
    def radius(self) -> float:
        """Circumradius as a fraction of the image side."""
        return self.size.radius * self.scale


@dataclass(frozen=True)
class Scene:
    background: Color
    objects: list[Obj] = field(default_factory=list)  # drawn in order; captions and evaluation use objects[0]

    def __post_init__(self):
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        if any(o.color == self.background for o in self.objects):
            raise ValueError("an object cannot have the background colour")

    @property
    def obj(self) -> Obj:
        return self.objects[0]

    def spec(self) -> PromptSpec:
        """Every attribute of the (first) object and the background."""
        o = self.obj
        return PromptSpec(o.shape, o.color, self.background, o.size, o.position)


def make_scene(shape: Shape, color: Color, background: Color, size: Size = Size.LARGE,
               position: Position = Position.CENTER) -> Scene:
    """An unjittered single-object scene (handy in tests and demos)."""
    return Scene(Color(background), [Obj(Shape(shape), Color(color), Size(size), Position(position))])


# --- split and enumeration -------------------------------------------------------------------------------------

def is_held_out(shape: Shape, color: Color, background: Color) -> bool:
    """The held-out rule (see the module docstring)."""
    return (shape.index + color.index + background.index) % HELD_OUT_MODULUS == 0


def triples(split: Split | str = Split.ALL, config: WorldConfig = DEFAULT_CONFIG) -> list[tuple[Shape, Color, Color]]:
    """(shape, colour, background) triples of a split, in a fixed order."""
    split = Split(split)
    out = []
    for shape, color, bg in product(config.shapes, config.colors, config.colors):
        if color == bg:
            continue
        if split is Split.ALL or (split is Split.HELD_OUT) == is_held_out(shape, color, bg):
            out.append((shape, color, bg))
    return out


def all_combinations(split: Split | str = Split.ALL, config: WorldConfig = DEFAULT_CONFIG) -> list[PromptSpec]:
    """Every fully specified attribute combination of a split, in a fixed order."""
    return [PromptSpec(shape, color, bg, size, pos)
            for (shape, color, bg), size, pos in product(triples(split, config), config.sizes, config.positions)]


# --- sampling --------------------------------------------------------------------------------------------------

def random_obj(rng: np.random.Generator, shape: Shape, color: Color, config: WorldConfig = DEFAULT_CONFIG) -> Obj:
    """An object with a random size and position and seeded jitter."""
    size = config.sizes[rng.integers(len(config.sizes))]
    position = config.positions[rng.integers(len(config.positions))]
    dx, dy = rng.uniform(-config.position_jitter, config.position_jitter, size=2)
    scale = 1.0 + rng.uniform(-config.scale_jitter, config.scale_jitter)
    max_rot = MAX_ROTATION[shape] if config.rotate else 0.0
    rotation = rng.uniform(-max_rot, max_rot)
    return Obj(shape, color, size, position, float(dx), float(dy), float(scale), float(rotation))


def sample_scenes(n: int, seed: int, split: Split | str = Split.TRAIN,
                  config: WorldConfig = DEFAULT_CONFIG) -> list[Scene]:
    """``n`` single-object scenes drawn uniformly over the split's triples; the same (n, seed, ...) gives the same
    scenes, and the first k scenes of a longer draw equal a draw of k."""
    pool = triples(split, config)
    if not pool:
        raise ValueError(f"split {Split(split).value!r} has no (shape, colour, background) triples in this config")
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        shape, color, bg = pool[rng.integers(len(pool))]
        scenes.append(Scene(bg, [random_obj(rng, shape, color, config)]))
    return scenes


# --- rendering -------------------------------------------------------------------------------------------------

def shape_outline(shape: Shape, rotation: float = 0.0) -> list[tuple[float, float]]:
    """Polygon vertices of a shape with circumradius 1 centred on the origin, y down, pointing up before rotation
    (circles return a 64-gon)."""
    if shape is Shape.CIRCLE:
        pts = [(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    elif shape is Shape.SQUARE:
        pts = [_polar(1.0, 45 + 90 * k) for k in range(4)]
    elif shape is Shape.TRIANGLE:
        pts = [_polar(1.0, -90 + 120 * k) for k in range(3)]
    elif shape is Shape.STAR:
        pts = [_polar(1.0 if k % 2 == 0 else STAR_INNER_RATIO, -90 + 36 * k) for k in range(10)]
    elif shape is Shape.CROSS:
        arm = 1.0 / math.hypot(1.0, CROSS_ARM_RATIO)
        a = CROSS_ARM_RATIO * arm
        quarter = [(a, -arm), (a, -a), (arm, -a)]  # one arm's corner run; the other three are 90-degree turns
        pts = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(math.radians(-rotation)), math.sin(math.radians(-rotation))
    return [(x * c - y * s, x * s + y * c) for x, y in pts]


def _polar(r: float, degrees: float) -> tuple[float, float]:
    return r * math.cos(math.radians(degrees)), r * math.sin(math.radians(degrees))


def render(scene: Scene, size: int = 128, supersample: int = 4) -> Image.Image:
    """The scene as an anti-aliased RGB image of ``size`` x ``size`` px.

    Drawn at ``supersample`` x the size and box-filtered down: each output pixel is the exact average of its
    sub-samples (coverage anti-aliasing), with none of the ringing halos a Lanczos filter would add at hard edges.
    """
    big = size * supersample
    canvas = Image.new("RGB", (big, big), scene.background.rgb)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        cx, cy = (v * big for v in o.center)
        r = o.radius * big
        if o.shape is Shape.CIRCLE:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.color.rgb)
        else:
            draw.polygon([(cx + r * x, cy + r * y) for x, y in shape_outline(o.shape, o.rotation)], fill=o.color.rgb)
    return canvas.reduce(supersample) if supersample > 1 else canvas
