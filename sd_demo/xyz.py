"""X/Y/Z plot (A1111's script): one parameter per axis, a generation per cell, a labelled grid of them.

Axes name a parameter and list its values (``"3, 5, 7"``, ``"10-30 (+10)"``, ``"1-2 [5]"``); every cell is an
ordinary generation with that cell's values, so it equals the single image those parameters give, bit for bit. The
seed is fixed once for the whole plot (a -1 is drawn once), as in A1111, so the axes are the only difference.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import product

from PIL import Image, ImageDraw, ImageFont

from .generate import GenerationParams, resolve_seed
from .sampling.registry import SAMPLERS, SCHEDULES

# axis name -> (GenerationParams field or a special, value type); "Nothing" leaves an axis unused
AXES = {
    "Nothing": (None, str),
    "Seed": ("seed", int),
    "Steps": ("steps", int),
    "CFG scale": ("guidance_scale", float),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule", str),
    "Prompt S/R": ("prompt", str),
    "Denoising strength": ("strength", float),
    "Hires upscale": ("hires_scale", float),
    "CFG cutoff": ("cfg_cutoff", float),
    "Deep cache": ("deep_cache", int),
    "LoRA scale": ("lora_scale", float),
    "Checkpoint": ("model", str),
}
MAX_CELLS = 64  # a plot is a batch job of its own: this many images at most
_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*-\s*(-?[\d.]+)\s*(?:\(\s*\+?\s*(-?[\d.]+)\s*\)|\[\s*(\d+)\s*\])?\s*$")


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple  # typed values, in order

    @property
    def used(self) -> bool:
        return self.name != "Nothing"

    def label(self, value) -> str:
        return f"{self.name}: {value:g}" if isinstance(value, float) else f"{self.name}: {value}"


def parse_axis(name: str, text: str) -> Axis:
    """An axis from its name and values text: comma-separated values, or a range ``a-b`` (step 1), ``a-b (+s)``
    (step s) or ``a-b [n]`` (n values); ValueError saying what to change."""
    if name not in AXES:
        raise ValueError(f"xyz: unknown axis {name!r}; choose one of {', '.join(AXES)}")
    kind = AXES[name][1]
    if name == "Nothing":
        return Axis(name, (None,))
    items: list = []
    for part in _split(text or ""):
        m = _RANGE.match(part) if kind is not str else None
        items += _range(m, kind, name) if m and part.strip()[1:].find("-") >= 0 else [_typed(part, kind, name)]
    if not items:
        raise ValueError(f"xyz: {name} has no values; list them separated by commas")
    if name == "Sampler":
        _known(name, items, SAMPLERS)
    if name == "Schedule type":
        _known(name, items, SCHEDULES)
    return Axis(name, tuple(items))


def _split(text: str) -> list[str]:
    """Comma-separated values; a value may be quoted to hold a comma (A1111's CSV form)."""
    import csv

    return [v.strip() for v in next(csv.reader([text], skipinitialspace=True), []) if v.strip()]


def _typed(text: str, kind, name: str):
    try:
        value = kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        raise ValueError(f"xyz: {name} value {text!r} is not a {kind.__name__}") from None
    return value


def _range(m: re.Match, kind, name: str) -> list:
    a, b = float(m.group(1)), float(m.group(2))
    if m.group(4):  # [n]: n values evenly from a to b
        n = int(m.group(4))
        values = [a + (b - a) * i / max(1, n - 1) for i in range(n)]
    else:
        step = float(m.group(3) or (1 if b >= a else -1))
        if step == 0 or (b - a) / step < 0:
            raise ValueError(f"xyz: {name} range {m.group(0).strip()!r} never reaches its end; check the step")
        count = int(round((b - a) / step + 1e-9)) + 1
        if count > MAX_CELLS:
            raise ValueError(f"xyz: {name} range gives {count} values; at most {MAX_CELLS} cells in a plot")
        values = [a + step * i for i in range(count)]
    return [kind(round(v)) if kind is int else round(v, 6) for v in values]


def _known(name: str, values: list, names) -> None:
    for v in values:
        if v not in names:
            raise ValueError(f"xyz: {name} {v!r} is unknown; choose from {', '.join(names)}")


@dataclass(frozen=True)
class Cell:
    """One generation of the plot: its place and what it changes."""

    x: int
    y: int
    z: int
    params: GenerationParams
    model: str | None
    loras: tuple


def cells(params: GenerationParams, axes: list[Axis], model: str | None, loras: list[tuple[str, float]]
          ) -> list[Cell]:
    """Every cell in the order it is made: the checkpoint axis outermost (each model loads once), then z, y, x.
    The seed is fixed once; Prompt S/R replaces the axis's first value in the prompt and the negative prompt."""
    x, y, z = (axes + [parse_axis("Nothing", "")] * 3)[:3]
    for axis in (x, y, z):
        if axis.name == "Prompt S/R" and axis.values[0] not in params.prompt + params.negative_prompt:
            raise ValueError(f"xyz: Prompt S/R's first value {axis.values[0]!r} is not in the prompt; it is the "
                             "text the other values replace")
        if axis.name == "LoRA scale" and not loras:
            raise ValueError("xyz: LoRA scale needs a LoRA in the LoRA list")
    if len(x.values) * len(y.values) * len(z.values) > MAX_CELLS:
        raise ValueError(f"xyz: {len(x.values)}x{len(y.values)}x{len(z.values)} cells is too many; at most "
                         f"{MAX_CELLS}")
    base = replace(params.validate(), seed=resolve_seed(params.seed), batch_size=1)
    out = []
    for (k, zv), (j, yv), (i, xv) in product(enumerate(z.values), enumerate(y.values), enumerate(x.values)):
        p, m, lo = base, model, tuple(loras)
        for axis, value in ((x, xv), (y, yv), (z, zv)):
            p, m, lo = _apply(axis, value, p, m, lo)
        out.append(Cell(i, j, k, p.validate(), m, lo))
    checkpoint = next((a for a in (x, y, z) if a.name == "Checkpoint"), None)
    if checkpoint is not None:  # models outermost, the grid order kept within each
        order = {v: n for n, v in enumerate(checkpoint.values)}
        out.sort(key=lambda c: order[c.model])
    return out


def _apply(axis: Axis, value, p: GenerationParams, model, loras):
    field = AXES[axis.name][0]
    if field is None:
        return p, model, loras
    if field == "model":
        return p, value, loras
    if field == "lora_scale":
        return p, model, tuple((src, value) for src, _ in loras)
    if field == "prompt":
        old = axis.values[0]
        return replace(p, prompt=p.prompt.replace(old, value),
                       negative_prompt=p.negative_prompt.replace(old, value)), model, loras
    return replace(p, **{field: value}), model, loras


def grid(images: list[Image.Image], axes: list[Axis]) -> Image.Image:
    """The cells (in x, y, z order) as one labelled picture: columns x, rows y, one block per z side by side."""
    x, y, z = (axes + [parse_axis("Nothing", "")] * 3)[:3]
    nx, ny, nz = len(x.values), len(y.values), len(z.values)
    w, h = images[0].size
    font = ImageFont.load_default(size=max(12, w // 14))
    top = font.size * 2 + 8 if x.used else 0
    top += font.size * 2 if z.used else 0
    left = max((int(font.getlength(y.label(v))) for v in y.values), default=0) + 12 if y.used else 0
    block = left + nx * w
    sheet = Image.new("RGB", (block * nz + 16 * (nz - 1), top + ny * h), "white")
    draw = ImageDraw.Draw(sheet)
    for k in range(nz):
        x0 = k * (block + 16)
        if z.used:
            draw.text((x0 + block / 2, 4), z.label(z.values[k]), fill="black", font=font, anchor="mt")
        for i, v in enumerate(x.values):
            if x.used:
                draw.text((x0 + left + i * w + w / 2, top - 6), x.label(v), fill="black", font=font, anchor="md")
        for j, v in enumerate(y.values):
            if y.used:
                draw.text((x0 + left - 6, top + j * h + h / 2), y.label(v), fill="black", font=font, anchor="rm")
            for i in range(nx):
                sheet.paste(images[(k * ny + j) * nx + i].resize((w, h)), (x0 + left + i * w, top + j * h))
    return sheet
