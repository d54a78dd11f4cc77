"""Command line: ``python -m sd_demo generate ...``. Flags for generation come from GenerationParams' fields."""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from . import exit_on_sigterm, setup_logging
from .flags import add_compile_flag, add_field_flags
from .generate import GenerationParams, param_fields

log = logging.getLogger("sd_demo")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Model and hardware flags shared by the CLI and app.py."""
    parser.add_argument("--model", default="embedded", help="Hub id[@revision], local diffusers folder, or 'embedded' "
                                                              "(default: embedded)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="auto: fp16 on CUDA/MPS, fp32 on CPU")
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"],
                        help="auto: xformers on CUDA when it works, else PyTorch SDPA")
    add_compile_flag(parser)
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading .bin/.ckpt weights (pickle can run code: only for repos you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd_demo", description="Stable Diffusion from the command line")
    sub = parser.add_subparsers(dest="command", required=True)
    # (no ArgumentDefaultsHelpFormatter: the field flags' help names its default already)
    gen = sub.add_parser("generate", help="text to image")
    add_runtime_flags(gen)
    add_field_flags(gen, param_fields(), none_type=int)  # width/height: None = the model's size
    gen.add_argument("--lora", action="append", default=[], metavar="PATH_OR_REPO[:SCALE]",
                     help="apply a LoRA (a training --out folder, a .safetensors file or a Hub repo); repeatable")
    gen.add_argument("--init-image", metavar="FILE", help="image to image: start from this picture (see --strength, "
                     "--resize-mode)")
    gen.add_argument("--mask", metavar="FILE",
                     help="inpainting: redraw where this picture is white (with --init-image)")
    gen.add_argument("--prompts-file", metavar="FILE", help="one job per line (A1111's 'prompts from file'): a "
                     "prompt, or this command's flags ('--prompt \"a cat\" --steps 30 --seed 5'; A1111's "
                     "--negative_prompt, --cfg_scale, --sampler_name too) over the others; --out is a folder. "
                     "'accelerate launch -m sd_demo generate ...' splits the lines across processes / GPUs")
    gen.add_argument("--out", required=True, help="FILE.png, or a folder (A1111-style numbered names)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    tr = sub.add_parser("train", help="fine-tune a model (LoRA, DreamBooth, textual inversion, full)")
    from .train.config import config_fields

    add_field_flags(tr, config_fields())
    return parser


def output_paths(out: str, seeds: list[int], overwrite: bool) -> list[Path] | None:
    """Exact file paths for a FILE.png --out; None means 'a folder, number the files'."""
    path = Path(out)
    if path.suffix.lower() != ".png":
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out: '{out}' is a file but not a .png; give FILE.png or a folder")
        return None
    paths = [path] if len(seeds) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(len(seeds))]
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise ValueError(f"--out: {', '.join(taken)} already exists; choose another name or pass --overwrite")
    return paths


def read_image(path: str | None, flag: str):
    """The picture at ``path`` (fully read), None for None; ValueError naming the flag when it is not one."""
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"{flag}: '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{flag}: '{path}' is not a readable image ({exc})") from None


class _LineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad line is the user's to fix: a ValueError, not argparse's exit
        raise ValueError(message)


# A1111's names for the flags its "prompts from file" lines use, where ours differ
_A1111_FLAGS = {"--cfg-scale": "--guidance", "--sampler-name": "--sampler", "--batch-size": "--batch",
                "--scheduler": "--schedule", "--denoising-strength": "--strength"}


def prompt_lines(path: str, base: GenerationParams) -> list[GenerationParams]:
    """The jobs of a prompts file: per non-empty line a prompt, or generation flags over ``base``'s values;
    ValueError naming the line."""
    import dataclasses
    import shlex

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts-file: cannot read '{path}' ({exc})") from None
    parser = _LineParser(prog="line", add_help=False)
    add_field_flags(parser, param_fields(), none_type=int)
    parser.set_defaults(**dataclasses.asdict(base))
    jobs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if not line.lstrip().startswith("--"):
                jobs.append(dataclasses.replace(base, prompt=line.strip()).validate())
                continue
            tokens = shlex.split(line)
            tokens = [_A1111_FLAGS.get(t.replace("_", "-"), t.replace("_", "-")) if t.startswith("--") else t
                      for t in tokens]
            jobs.append(GenerationParams(**vars(parser.parse_args(tokens))).validate())
        except ValueError as exc:
            raise ValueError(f"--prompts-file: line {n}: {exc}") from None
    if not jobs:
        raise ValueError(f"--prompts-file: '{path}' has no prompts; write one per line")
    return jobs


def cmd_prompts_file(args, base: GenerationParams) -> int:
    """Every line of --prompts-file into the --out folder; under ``accelerate launch`` each process takes its
    share of the lines on its own device."""
    from accelerate import PartialState

    from .engine import Engine, EngineSettings, save_result
    from .models import parse_lora

    jobs = prompt_lines(args.prompts_file, base)
    if Path(args.out).suffix.lower() == ".png":
        raise ValueError("--out: with --prompts-file give a folder (the images are numbered)")
    state = PartialState()
    device = str(state.device) if state.num_processes > 1 else args.device
    engine = Engine(EngineSettings(args.model, device, args.dtype, args.attention, args.allow_pickle,
                                   compile=args.compile))
    loras = [parse_lora(s) for s in args.lora]
    with state.split_between_processes(jobs) as mine:
        for params in mine:
            result, _ = engine.generate(params, save=False, loras=loras)
            for path, seed in zip(save_result(result, Path(args.out)), result.seeds):
                print(f"{path}  (seed {seed})")
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .engine import Engine, EngineSettings, save_result
    from .infotext import write_png

    params = GenerationParams(**{name: getattr(args, name) for name, _, _ in param_fields()}).validate()
    if args.prompts_file:
        return cmd_prompts_file(args, params)
    seeds_hint = [0] * params.batch_size
    paths = output_paths(args.out, seeds_hint, args.overwrite)  # refuse before the slow part
    init, mask = read_image(args.init_image, "--init-image"), read_image(args.mask, "--mask")
    engine = Engine(EngineSettings(args.model, args.device, args.dtype, args.attention, args.allow_pickle,
                                   compile=args.compile))
    from .models import parse_lora

    loras = [parse_lora(s) for s in args.lora]
    model = engine.load()
    with model.lock:
        model.set_loras(loras)  # a bad --lora fails here, before any output
    print(model.describe(), file=sys.stderr)
    bar = tqdm(total=params.steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def on_step(ev):
        bar.total = ev.total
        bar.update(ev.step - bar.n)

    result, _ = engine.generate(params, on_step=on_step, save=False, loras=loras, init_image=init, mask=mask)
    bar.close()
    if paths is None:
        written = save_result(result, Path(args.out))
    else:
        for image, info, path in zip(result.images, result.infotexts, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_png(image, path, info)
        written = paths
    for path, seed in zip(written, result.seeds):
        print(f"{path}  (seed {seed})")
    return 0


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .train.config import TrainConfig, config_fields
    from .train.loop import train

    cfg = TrainConfig(**{name: getattr(args, name) for name, _, _ in config_fields()}).validate()
    bar = tqdm(total=cfg.steps, unit="step", file=sys.stderr, dynamic_ncols=True)  # total: from the preset

    def on_event(ev):
        bar.total = ev.total
        if ev.message:  # the preset's values, the memory and time estimates
            bar.write(ev.message, file=sys.stderr)
            return
        bar.update(ev.step - bar.n)
        bar.set_postfix(loss=f"{ev.loss:.4f}", lr=f"{ev.lr:.2e}")

    try:
        result = train(cfg, on_event=on_event)
    finally:  # ends the bar's line, so an error message starts a line of its own
        bar.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for f in result.files:
        print(f)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "train":
            return cmd_train(args)
    except ValueError as exc:  # user-facing mistakes: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a folder without write permission: say which file, keep it one line
        where = f" ({exc.filename})" if exc.filename else ""
        hint = "; earlier checkpoints are intact: free space, then rerun with --resume latest" \
            if args.command == "train" and exc.errno == errno.ENOSPC else ""
        print(f"error: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    exit_on_sigterm()  # here, not in main(): tests and embedders call main() and keep their own signal handling
    sys.exit(main())
