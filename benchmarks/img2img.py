"""What img2img and the hires fix do on the embedded model, judged by the project's evaluator (issue 20).

    python benchmarks/img2img.py [--model embedded] [--images 8] [--prompts 12] [--random 24] [--skip-hires]

1. Image to image: a rendered scene, a prompt that names a new colour (the issue's own case also names the position;
   the others leave it to the picture); per denoising strength, how many of N images take the new colour, keep the
   shape, keep the position. Then ``--random`` scenes of random shape, colour, background, size and position, each
   to a random other colour (one image each), pooled per strength.
2. Hires fix 128 -> 256 px: held-out prompts' accuracy (on the result shrunk back to 128 px) per upscaler and
   strength, against plain 128 px generation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (shape, colour, background, position, new colour, whether the prompt names the position): the first two are
# issue 20's example, on its blue background and on white
SCENES = [("circle", "red", "blue", "left", "green", True), ("circle", "red", "white", "left", "green", True),
          ("star", "white", "blue", "right", "orange", False),
          ("square", "yellow", "blue", "top left", "purple", False),
          ("circle", "red", "blue", "bottom right", "green", False), ("cross", "green", "blue", "bottom", "red", False)]
STRENGTHS = (0.3, 0.5, 0.65, 0.8, 1.0)
HIRES = [("Latent", 0.7), ("Latent", 0.55), ("Lanczos", 0.4), ("Lanczos", 0.3)]


def recolour_counts(model, cases, strength: float, seed: int) -> tuple[int, int, int, int]:
    """Of images redrawn from each (scene, prompt, new colour, images) case: (images, new colour, shape kept,
    position kept)."""
    from sd_demo.generate import GenerationParams, generate
    from sd_demo.shapes.evaluate import detect
    from sd_demo.shapes.world import render

    counts = [0, 0, 0, 0]
    for scene, prompt, new, n in cases:
        images = generate(model, GenerationParams(prompt=prompt, seed=seed, strength=strength, batch_size=n),
                          init_image=render(scene, 128)).images
        for d in map(detect, images):
            counts = [counts[0] + 1, counts[1] + (d.color == new), counts[2] + (d.shape == scene.obj.shape),
                      counts[3] + (d.position == scene.obj.position)]
    return tuple(counts)


def random_cases(n: int, seed: int = 11) -> list:
    """``n`` scenes of random attributes (either split), each with a prompt of another colour that names shape,
    colour and background only: the size and the position are the picture's to keep."""
    from dataclasses import replace

    import numpy as np

    from sd_demo.shapes.vocab import Color
    from sd_demo.shapes.world import CaptionStyle, caption, sample_scenes

    rng = np.random.default_rng(seed)
    cases = []
    for scene in sample_scenes(n, seed, "all"):
        new = [c for c in Color if c not in (scene.obj.color, scene.background)][rng.integers(len(Color) - 2)]
        target = replace(scene, objects=[replace(scene.obj, color=new)])
        cases.append((scene, caption(target, CaptionStyle.CANONICAL), new, 1))
    return cases


def img2img_rows(model, n: int, random: int) -> list[str]:
    from sd_demo.shapes.vocab import Color, Position, Shape
    from sd_demo.shapes.world import make_scene

    rows = []
    for shape, old, background, where, new, say_where in SCENES:
        scene = make_scene(Shape(shape), Color(old), Color(background), position=Position(where))
        where_words = f" on the {where}" if say_where else ""
        prompt = f"a{'n' * (new[0] in 'aeiou')} {new} {shape}{where_words} on a {background} background"
        for s in STRENGTHS:
            _, recoloured, shaped, placed = recolour_counts(model, [(scene, prompt, Color(new), n)], s, 100)
            rows.append(f"| {old} {shape}, {where}, on {background} -> \"{prompt}\" | {s} | {recoloured}/{n} | "
                        f"{shaped}/{n} | {placed}/{n} |")
    cases = random_cases(random) if random else []
    for s in STRENGTHS if cases else ():
        total, recoloured, shaped, placed = recolour_counts(model, cases, s, 100)
        rows.append(f"| {total} random scenes -> another colour | {s} | {recoloured}/{total} | {shaped}/{total} | "
                    f"{placed}/{total} |")
    return rows


def hires_rows(model, n: int) -> list[str]:
    from PIL import Image

    from sd_demo.generate import GenerationParams, generate
    from sd_demo.shapes.eval_model import heldout_prompts
    from sd_demo.shapes.evaluate import evaluate_set

    prompts = heldout_prompts(n, seed=3)

    def accuracy(**kw) -> str:
        images = [generate(model, GenerationParams(prompt=p, seed=i, **kw)).images[0].resize(
            (128, 128), Image.Resampling.BOX) for i, p in enumerate(prompts)]
        report = evaluate_set(prompts, images)
        return " | ".join(f"{report.accuracy(a):.0%}" for a in ("shape", "color", "background", "position"))

    rows = [f"| 128 px, no hires fix | - | {accuracy()} |"]
    for upscaler, strength in HIRES:
        rows.append(f"| 256 px, {upscaler} | {strength} | "
                    f"{accuracy(hires_scale=2, hires_upscaler=upscaler, strength=strength)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded' or a diffusers folder of a shapes model")
    p.add_argument("--images", type=int, default=8, help="images per scene and strength")
    p.add_argument("--random", type=int, default=24, help="random scenes recoloured (one image each per strength)")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts for the hires fix")
    p.add_argument("--skip-hires", action="store_true")
    a = p.parse_args(argv)
    from sd_demo.models import load_model

    model = load_model(a.model)
    print("| picture -> prompt | strength | new colour | shape kept | position kept |\n|---|---|---|---|---|")
    print("\n".join(img2img_rows(model, a.images, a.random)), flush=True)
    if not a.skip_hires:
        print("\n| hires fix | strength | shape | colour | background | position |\n|---|---|---|---|---|---|")
        print("\n".join(hires_rows(model, a.prompts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
