"""The shapes world's vocabulary: shapes, palette colours, sizes and positions.

Enum member order is part of the contract: the train / held-out split (``world.is_held_out``) is defined on these
indices, so append new members at the end, never reorder.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Shape(str, Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    STAR = "star"
    # A plus sign: 4-fold like the square but deeply concave, so the evaluator tells them apart by solidity.
    CROSS = "cross"

    @property
    def index(self) -> int:
        return list(Shape).index(self)


class Color(str, Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"
    PURPLE = "purple"
    ORANGE = "orange"
    WHITE = "white"
    BLACK = "black"

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self]

    @property
    def index(self) -> int:
        return list(Color).index(self)


# Chosen so every pair is >= 112 apart in RGB (closest pairs: yellow/orange 112, red/orange 113, blue/purple 136):
# a model's off-by-40 colours still land on the right name, and an object always stands out from its background.
PALETTE: dict[Color, tuple[int, int, int]] = {
    Color.RED: (215, 25, 35),
    Color.GREEN: (30, 160, 60),
    Color.BLUE: (25, 75, 235),
    Color.YELLOW: (250, 230, 40),
    Color.PURPLE: (145, 35, 185),
    Color.ORANGE: (255, 125, 0),
    Color.WHITE: (245, 245, 245),
    Color.BLACK: (15, 15, 15),
}


class Size(str, Enum):
    SMALL = "small"
    LARGE = "large"

    @property
    def radius(self) -> float:
        """Nominal circumradius as a fraction of the image side (same for every shape, so size means extent)."""
        return SIZE_RADIUS[self]


# A factor of 2 in extent: with +-10 % jitter the two sizes stay >= 1.6x apart, easy to judge even on blurry output.
SIZE_RADIUS: dict[Size, float] = {Size.SMALL: 0.10, Size.LARGE: 0.20}


class Position(str, Enum):
    CENTER = "center"
    LEFT = "left"
    RIGHT = "right"
    TOP = "top"
    BOTTOM = "bottom"
    TOP_LEFT = "top left"
    TOP_RIGHT = "top right"
    BOTTOM_LEFT = "bottom left"
    BOTTOM_RIGHT = "bottom right"

    @property
    def offset(self) -> tuple[float, float]:
        """(dx, dy) of the object's centre from the image centre, as fractions of the side (y grows downwards)."""
        dx = -POSITION_STEP if "left" in self.value else POSITION_STEP if "right" in self.value else 0.0
        dy = -POSITION_STEP if "top" in self.value else POSITION_STEP if "bottom" in self.value else 0.0
        return dx, dy

    @classmethod
    def from_parts(cls, horizontal: str | None, vertical: str | None) -> "Position":
        """Combine "left"/"right"/None and "top"/"bottom"/None into one position (None, None is the centre)."""
        words = " ".join(w for w in (vertical, horizontal) if w)
        return cls(words) if words else cls.CENTER


# Off-centre objects sit a quarter of the side away from the centre: a large object (radius 0.2 + 10 % jitter)
# at the left still fits inside the frame, and the evaluator's decision line (half of this) has a wide margin.
POSITION_STEP = 0.25

ATTRIBUTES = ("shape", "color", "background", "size", "position")


@dataclass(frozen=True)
class PromptSpec:
    """The attributes a prompt asks for; None means the prompt does not say (any value is fine)."""

    shape: Shape | None = None
    color: Color | None = None
    background: Color | None = None
    size: Size | None = None
    position: Position | None = None

    def asked(self) -> dict[str, Enum]:
        """{attribute name: value} for the attributes the prompt mentions, in ATTRIBUTES order."""
        return {name: getattr(self, name) for name in ATTRIBUTES if getattr(self, name) is not None}

    def only(self, names: tuple[str, ...] | list[str]) -> "PromptSpec":
        """A copy that keeps just the named attributes (the others become None)."""
        return PromptSpec(**{name: getattr(self, name) if name in names else None for name in ATTRIBUTES})
