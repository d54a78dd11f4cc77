"""What img2img and the hires fix do on the embedded model, judged by the project's evaluator (issue 20).

    python benchmarks/img2img.py [--images 8] [--prompts 12]

1. Image to image: a rendered scene, a prompt that names a new colour and leaves the position to the picture;
   per denoising strength, how many of N images take the new colour, keep the shape, keep the position.
2. Hires fix 128 -> 256 px: held-out prompts' accuracy (on the result shrunk back to 128 px) per upscaler and
   strength, against plain 128 px generation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCENES = [("star", "white", "right", "orange"), ("square", "yellow", "top left", "purple"),
          ("circle", "red", "bottom right", "green"), ("cross", "green", "bottom", "red")]
STRENGTHS = (0.5, 0.65, 0.8, 1.0)
HIRES = [("Latent", 0.7), ("Latent", 0.55), ("Lanczos", 0.4), ("Lanczos", 0.3)]


def img2img_rows(model, n: int) -> list[str]:
    from sd_demo.generate import GenerationParams, generate
    from sd_demo.shapes.evaluate import detect
    from sd_demo.shapes.vocab import Color, Position, Shape
    from sd_demo.shapes.world import make_scene, render

    rows = []
    for shape, old, where, new in SCENES:
        src = render(make_scene(Shape(shape), Color(old), Color.BLUE, position=Position(where)), 128)
        prompt = f"a {new} {shape} on a blue background"
        for s in STRENGTHS:
            images = generate(model, GenerationParams(prompt=prompt, seed=100, strength=s, batch_size=n),
                              init_image=src).images
            d = [detect(im) for im in images]
            recoloured = sum(x.color is not None and x.color.value == new for x in d)
            shaped, placed = sum(x.shape == Shape(shape) for x in d), sum(x.position == Position(where) for x in d)
            rows.append(f"| {old} {shape}, {where} -> {new} | {s} | {recoloured}/{n} | {shaped}/{n} | {placed}/{n} |")
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
    p.add_argument("--images", type=int, default=8, help="images per scene and strength")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts for the hires fix")
    a = p.parse_args(argv)
    from sd_demo.models import load_model

    model = load_model("embedded")
    print("| picture -> prompt's colour | strength | new colour | shape kept | position kept |\n|---|---|---|---|---|")
    print("\n".join(img2img_rows(model, a.images)))
    print("\n| hires fix | strength | shape | colour | background | position |\n|---|---|---|---|---|---|")
    print("\n".join(hires_rows(model, a.prompts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
