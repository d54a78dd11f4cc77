"""Concepts the embedded model has never seen, for proving that training teaches something new.

The base model is trained on the five shapes and eight colours of ``vocab``; these live outside those enums (so the
base model's training data and its train / held-out split are unchanged by them):

- a **bar** (a horizontal rectangle, 5 : 2): drawn like the world's objects (same sizes, positions and jitter),
  recognised by its elongation (the 2nd angular harmonic of its outline, near 0 for every base shape: circle,
  square, triangle, star and cross all have 3-fold or higher symmetry). It is the shape the LoRA / DreamBooth proofs
  teach;
- a **ring** (an annulus), recognised by its hole, i.e. the middle of the object has the background's colour. A
  small ring's hole is 13 px wide, under two latent pixels of the 16 x 16 latent: generating it asks more of the
  small UNet's resolution than of the training method, so the proofs use the bar;
- **pink**, a colour away from every palette colour (>= 130 apart in RGB; the closest are white and purple).

``bar_scenes`` / ``ring_scenes`` / ``pink_scenes`` make small training sets (images + captions with a trigger word) and
``shows_ring`` / ``object_is_pink`` judge generated images by pixels, like ``evaluate``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .captions import CaptionStyle, caption
from .evaluate import nearest_color
from .pixels import WORK_SIZE, measure, to_array
from .vocab import PALETTE, Color, Shape
from .world import Scene, random_obj, render

BAR_ASPECT = 2.5  # length / height; the half-diagonal is the world's circumradius
BAR_MIN_ELONGATION = 0.25  # 2nd harmonic of r(theta) / mean radius: >= 0.48 on rendered bars, <= 0.015 on base shapes
RING_INNER = 0.5  # inner / outer radius: the hole is wide enough to survive a blurry decoder even for small rings
PINK = (255, 120, 200)
HOLE_PROBE = 0.3  # probe disc radius / outer radius; well inside the hole (0.5)


@dataclass(frozen=True)
class NovelScene:
    """A scene whose object is a ring or bar and/or pink; ``scene`` holds the labels, the flags what is new."""

    scene: Scene  # its object: a circle with the new shape's position and size (a pink one carries colour WHITE)
    ring: bool
    pink: bool
    bar: bool = False

    def caption(self, word: str, style: CaptionStyle | str = CaptionStyle.FULL, rng=None) -> str:
        """The scene's caption with ``word`` standing for the new concept (a bar or ring shape, or pink)."""
        text = caption(self.scene, style, rng)
        if self.ring or self.bar:
            text = text.replace(Shape.CIRCLE.value, word, 1)
        if self.pink:
            text = text.replace(f"{Color.WHITE.value} ", f"{word} ", 1)
        return text


def render_novel(ns: NovelScene, size: int = 128, supersample: int = 4) -> Image.Image:
    """Anti-aliased like ``world.render``: drawn at ``supersample`` x and box-filtered down."""
    big = size * supersample
    o = ns.scene.obj
    colour = PINK if ns.pink else o.color.rgb
    canvas = Image.new("RGB", (big, big), ns.scene.background.rgb)
    draw = ImageDraw.Draw(canvas)
    cx, cy = (v * big for v in o.center)
    r = o.radius * big
    if ns.bar:
        half_h = r / (1 + BAR_ASPECT ** 2) ** 0.5
        draw.rectangle([cx - BAR_ASPECT * half_h, cy - half_h, cx + BAR_ASPECT * half_h, cy + half_h], fill=colour)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    if ns.ring:
        ri = r * RING_INNER
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=ns.scene.background.rgb)
    return canvas.reduce(supersample)


def _scenes(n: int, seed: int, *, ring: bool = False, pink: bool = False, bar: bool = False) -> list[NovelScene]:
    """``n`` seeded scenes. Object colours come in seeded rounds, every colour once before any repeats, so even a
    dozen images show the new shape in every colour (a set missing a colour teaches an adapter to avoid it);
    backgrounds are random. Pink ones are never on a white background ("white" stands in for pink in the labels)."""
    rng = np.random.default_rng(seed)
    colors = list(Color)
    out, round_ = [], []
    while len(out) < n:
        if not round_:
            round_ = [colors[i] for i in rng.permutation(len(colors))]
        color = Color.WHITE if pink else round_.pop()
        bg = colors[rng.integers(len(colors))]
        while bg == color:
            bg = colors[rng.integers(len(colors))]
        new_shape = ring or bar  # labelled as a circle of the same size and position
        shape = Shape.CIRCLE if new_shape else list(Shape)[rng.integers(len(Shape))]
        out.append(NovelScene(Scene(bg, [random_obj(rng, shape, color)]), ring=ring, pink=pink, bar=bar))
    return out


def ring_scenes(n: int, seed: int = 0) -> list[NovelScene]:
    return _scenes(n, seed, ring=True)


def bar_scenes(n: int, seed: int = 0) -> list[NovelScene]:
    return _scenes(n, seed, bar=True)


def pink_scenes(n: int, seed: int = 0) -> list[NovelScene]:
    return _scenes(n, seed, pink=True)


def with_base_shapes(scenes: list[NovelScene], n: int) -> list[Scene]:
    """``n`` world scenes made from ``scenes``, the new object replaced by each base shape in turn (same colour, size,
    position and background). Rendered, they are ground-truth DreamBooth class images whose captions differ from
    the instance captions in the shape word alone."""
    shapes = list(Shape)
    return [replace(scenes[k % len(scenes)].scene,
                    objects=[replace(scenes[k % len(scenes)].scene.obj, shape=shapes[k % len(shapes)])])
            for k in range(n)]


def write_dataset(scenes: list[NovelScene | Scene], word: str, folder: Path,
                  style: CaptionStyle | str = "full") -> Path:
    """PNG + sidecar .txt per scene (the layout the training engine reads); ``word`` names a novel scene's new
    concept, world scenes are captioned as they are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(scenes):
        novel = isinstance(sc, NovelScene)
        (render_novel(sc) if novel else render(sc)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text((sc.caption(word, style) if novel else caption(sc, style)) + "\n")
    return folder


# --- judges ------------------------------------------------------------------------------------------------------

def shows_ring(image) -> bool:
    """An object is found and the middle of it has the background's colour (a hole), not the object's."""
    m = measure(image)
    if not m.found:
        return False
    img = to_array(image)
    yy, xx = np.mgrid[0:WORK_SIZE, 0:WORK_SIZE] + 0.5
    cx, cy = m.centroid[0] * WORK_SIZE, m.centroid[1] * WORK_SIZE
    probe = (xx - cx) ** 2 + (yy - cy) ** 2 <= (HOLE_PROBE * m.radius * WORK_SIZE) ** 2
    if not probe.any():
        return False
    middle = img[probe].mean(axis=0)
    to_bg = np.linalg.norm(middle - np.asarray(m.background_rgb))
    to_obj = np.linalg.norm(middle - np.asarray(m.object_rgb))
    return bool(to_bg < to_obj)


def shows_bar(image) -> bool:
    """An object is found and its outline is elongated (2-fold), which no base shape is."""
    m = measure(image)
    return bool(m.found and m.harmonics[2] >= BAR_MIN_ELONGATION)


def object_is_pink(image) -> bool:
    """The object's colour is nearer to pink than to every palette colour."""
    m = measure(image)
    if not m.found:
        return False
    rgb = np.asarray(m.object_rgb)
    nearest = nearest_color(rgb)
    return bool(np.linalg.norm(rgb - np.asarray(PINK)) < np.linalg.norm(rgb - np.asarray(PALETTE[nearest])))
