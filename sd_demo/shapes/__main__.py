"""Measure the shapes evaluator: python -m sd_demo.shapes [--n 1000] [--seed 0] [--blur 1.5 --noise 8]
[--save DIR]  (prints markdown tables; --save also writes a few example renders with their captions).

Also: ``python -m sd_demo.shapes train --out DIR`` (train the embedded model from nothing, see train.py) and
``python -m sd_demo.shapes eval --model DIR`` (held-out prompt adherence table, see eval_model.py), and
``python -m sd_demo.shapes train-tiny-vae --model DIR`` (its tiny VAE for --tiny-vae, see tiny_vae.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .bench import CLEAN, Corruption, corrupt, mismatch_rate, scene_images
from .captions import CaptionStyle, caption
from .evaluate import Report, detect, format_table, judge
from .world import render, sample_scenes


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sd_demo.shapes", description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="scenes per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blur", type=float, default=1.5, help="Gaussian blur radius (px) of the corrupted run")
    parser.add_argument("--noise", type=float, default=8.0, help="noise sigma (0..255) of the corrupted run")
    parser.add_argument("--save", type=Path, help="write 16 example renders (clean and corrupted) here")
    args = parser.parse_args(argv)
    corrupted = Corruption(args.blur, args.noise)
    for label, corruption in (("clean", CLEAN), (f"blur {args.blur} + noise {args.noise}", corrupted)):
        start = time.perf_counter()
        scenes, images = scene_images(args.n, args.seed, corruption)
        rendered = time.perf_counter()
        detections = [detect(image) for image in images]
        detected = time.perf_counter()
        report = Report([judge(caption(s), d) for s, d in zip(scenes, detections)])
        print(f"\n### {label}: {args.n} scenes judged against their own captions "
              f"(render {(rendered - start) / args.n * 1e3:.1f} ms, evaluate {(detected - rendered) / args.n * 1e3:.1f}"
              " ms per image)\n")
        print(format_table(report))
        rates = mismatch_rate(scenes, detections, args.seed)
        print("\nmismatch flagged (exactly the changed attribute): "
              + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    if args.save:
        save_examples(args.save, args.seed, corrupted)


def save_examples(out: Path, seed: int, corruption: Corruption) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, scene in enumerate(sample_scenes(16, seed, "all")):
        text = caption(scene, list(CaptionStyle)[i % len(CaptionStyle)], rng)
        image = render(scene)
        image.save(out / f"{i:02d}.png")
        corrupt(image, corruption, seed=i).save(out / f"{i:02d}_corrupted.png")
        print(f"{out / f'{i:02d}.png'}: {text}")


def train_main(argv: list[str]) -> None:
    from .train import add_arguments, config_from_args, run

    parser = argparse.ArgumentParser(prog="python -m sd_demo.shapes train",
                                     description="train the embedded shapes model from nothing (seeded)")
    add_arguments(parser)
    run(config_from_args(parser.parse_args(argv)), argv)


def eval_main(argv: list[str]) -> None:
    from .eval_model import main as eval_model_main

    eval_model_main(argv)


def tiny_vae_main(argv: list[str]) -> None:
    from .tiny_vae import main as tiny_vae_main_

    tiny_vae_main_(argv)


SUBCOMMANDS = {"train": train_main, "eval": eval_main, "train-tiny-vae": tiny_vae_main}


if __name__ == "__main__":
    main()
