"""Captions for shapes scenes and the parser that reads them (and users' prompts) back into a PromptSpec.

Every phrasing ``caption`` can produce parses back to the attributes it mentions (tests/test_shapes.py checks this
over all styles), so training captions and evaluation prompts share one language.
"""
from __future__ import annotations

import random
import re
from enum import Enum
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .vocab import ATTRIBUTES, Color, Position, PromptSpec, Shape, Size

if TYPE_CHECKING:  # world imports this module; only the type is needed here
    from .world import Scene

Rng = random.Random | np.random.Generator | None


class CaptionStyle(str, Enum):
    CANONICAL = "canonical"  # a red circle on a green background
    FULL = "full"  # a small red circle on the left on a green background
    TAGS = "tags"  # small red circle, left, green background
    BACKGROUND_FIRST = "background_first"  # a green background with a small red circle on the left
    NATURAL = "natural"  # one of several freer sentences, e.g. "At the top left, a large blue star on a ..."

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes a caption in this style states."""
        return ("shape", "color", "background") if self is CaptionStyle.CANONICAL else ATTRIBUTES


# Phrasings of "where"; the first of each list is the one used when no rng is given.
_WHERE_SIDE = ["on the {p}", "at the {p}", "to the {p}"]
_WHERE_EDGE = ["at the {p}", "near the {p}"]
_WHERE_CORNER = ["in the {p} corner", "at the {p}", "in the {q} corner"]  # {q}: "upper left", "lower right"
_WHERE_CENTER = ["in the center", "in the middle", "at the center", "centered"]
_TAG_POSITION = ["{p}", "{h}"]  # "top left" or "top-left"

_NATURAL = [
    "{A} {size} {color} {shape} {where} on {a_bg} {bg} background",
    "an image of {a} {size} {color} {shape} {where}, {bg} background",
    "{size} {color} {shape} {where} against a plain {bg} background",
    "a picture of {a} {size} {color} {shape} {where}, the background is {bg}",
    "{Where}, {a} {size} {color} {shape} on {a_bg} {bg} background.",
]


def caption(scene: "Scene", style: CaptionStyle | str = CaptionStyle.FULL, rng: Rng = None) -> str:
    """A caption of the scene's first object in ``style``; ``rng`` (random.Random or numpy Generator) picks among
    the style's phrasings, None always takes the first."""
    style = CaptionStyle(style)
    o = scene.obj
    words = {"size": o.size.value, "color": o.color.value, "shape": o.shape.value, "bg": scene.background.value}
    words["a"] = _article(words["size"])
    words["A"] = words["a"].capitalize()
    words["a_bg"] = _article(words["bg"])
    words["a_color"] = _article(words["color"])
    if style is CaptionStyle.CANONICAL:
        return "{a_color} {color} {shape} on {a_bg} {bg} background".format(**words)
    if style is CaptionStyle.TAGS:
        where = _pick(rng, _TAG_POSITION).format(p=o.position.value, h=o.position.value.replace(" ", "-"))
        return f"{words['size']} {words['color']} {words['shape']}, {where}, {words['bg']} background"
    words["where"] = _where(o.position, rng)
    words["Where"] = words["where"][0].upper() + words["where"][1:]
    if style is CaptionStyle.FULL:
        template = "{a} {size} {color} {shape} {where} on {a_bg} {bg} background"
    elif style is CaptionStyle.BACKGROUND_FIRST:
        template = "{a_bg} {bg} background with {a} {size} {color} {shape} {where}"
    else:
        template = _pick(rng, _NATURAL)
    return template.format(**words)


def random_caption(scene: "Scene", rng: Rng) -> str:
    """A caption in a style drawn uniformly by ``rng``: the mix to train on, so that the model sees both prompts
    that fix size and position and canonical ones that leave them open."""
    return caption(scene, _pick(rng, list(CaptionStyle)), rng)


def _where(position: Position, rng: Rng) -> str:
    if position is Position.CENTER:
        return _pick(rng, _WHERE_CENTER)
    if " " in position.value:
        upper = position.value.replace("top", "upper").replace("bottom", "lower")
        return _pick(rng, _WHERE_CORNER).format(p=position.value, q=upper)
    options = _WHERE_SIDE if position in (Position.LEFT, Position.RIGHT) else _WHERE_EDGE
    return _pick(rng, options).format(p=position.value)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: Rng, options: Sequence[str]) -> str:
    if rng is None:
        return options[0]
    if isinstance(rng, np.random.Generator):
        return options[int(rng.integers(len(options)))]
    return options[rng.randrange(len(options))]


# --- parsing ---------------------------------------------------------------------------------------------------

_COLOR_WORDS = {c.value: c for c in Color} | {"violet": Color.PURPLE}
_SHAPE_WORDS = {s.value: s for s in Shape} | {s.value + "s": s for s in Shape} | {
    "disc": Shape.CIRCLE, "disk": Shape.CIRCLE, "plus": Shape.CROSS, "stars": Shape.STAR}
_SIZE_WORDS = {"small": Size.SMALL, "tiny": Size.SMALL, "little": Size.SMALL,
               "large": Size.LARGE, "big": Size.LARGE, "huge": Size.LARGE}
_HORIZONTAL = {"left": "left", "right": "right"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_CENTER = {"center", "centre", "middle", "centered", "centred", "central"}
_BACKGROUND = {"background", "backdrop", "bg"}


def parse_prompt(prompt: str) -> PromptSpec:
    """The attributes a prompt asks for (case-insensitive); unmentioned ones are None.

    A colour followed by "background" (or after "background is") is the background; the first other colour is the
    object's. Without a "background" word, a second colour after "on"/"against" is taken as the background.
    """
    tokens = re.findall(r"[a-z]+", prompt.lower())
    background, color = None, None
    for i, tok in enumerate(tokens):
        if tok not in _COLOR_WORDS:
            continue
        if _is_background_slot(tokens, i) and background is None:
            background = _COLOR_WORDS[tok]
        elif color is None:
            color = _COLOR_WORDS[tok]
        elif background is None and i > 0 and tokens[i - 1] in ("on", "against"):
            background = _COLOR_WORDS[tok]
    return PromptSpec(
        shape=_first(tokens, _SHAPE_WORDS),
        color=color,
        background=background,
        size=_first(tokens, _SIZE_WORDS),
        position=_parse_position(tokens),
    )


def _is_background_slot(tokens: list[str], i: int) -> bool:
    after = tokens[i + 1] if i + 1 < len(tokens) else ""
    before = tokens[max(0, i - 2):i]
    return after in _BACKGROUND or (bool(before) and before[-1] in _BACKGROUND) or before == ["background", "is"]


def _first(tokens: list[str], table: dict):
    return next((table[t] for t in tokens if t in table), None)


def _parse_position(tokens: list[str]) -> Position | None:
    horizontal = _first(tokens, _HORIZONTAL)
    vertical = _first(tokens, _VERTICAL)
    if horizontal or vertical:
        return Position.from_parts(horizontal, vertical)
    if any(t in _CENTER for t in tokens):
        return Position.CENTER
    return None
