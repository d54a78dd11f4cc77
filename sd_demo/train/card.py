"""The README.md model card of a training result, in the Hub's format (YAML front matter + markdown)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from .config import Method, TrainConfig

_HPARAMS = ("method", "steps", "lr", "lr_schedule", "warmup_steps", "rank", "alpha", "resolution", "batch",
            "grad_accum", "seed", "snr_gamma", "noise_offset", "train_text_encoder", "caption_dropout", "random_flip",
            "buckets", "mixed_precision", "gradient_checkpointing", "target_modules", "num_class_images",
            "trigger_token", "init_word", "num_vectors")


def write_card(out: Path, cfg: TrainConfig, base_model: str, samples: list[Path], final_loss: float | None,
               license: str = "other", preset=None) -> Path:
    """``preset`` (presets.Resolved): the card names the preset and marks the values that came from it."""
    method = Method(cfg.method)
    lora = method in (Method.LORA, Method.DREAMBOOTH) and not cfg.dreambooth_full
    meta = {
        "base_model": base_model,
        "library_name": "diffusers",
        "license": license,
        "tags": ["text-to-image", "stable-diffusion", "diffusers", "sd_demo", *(["lora"] if lora else []),
                 *([method.value] if method != Method.LORA else [])],
        "inference": True,
    }
    if cfg.trigger:
        meta["instance_prompt"] = cfg.trigger
    hp = asdict(cfg)
    token = method == Method.TEXTUAL_INVERSION or cfg.trigger_token
    skip = {*(() if lora else ("rank", "alpha", "trigger_token", "target_modules")),
            *(() if method == Method.DREAMBOOTH else ("num_class_images",)), *(() if token else ("init_word", "num_vectors"))}
    from_preset = preset.from_preset if preset else {}
    rows = "\n".join(f"| {k} | {hp[k]} |{' preset' if k in from_preset else ''} |" for k in _HPARAMS if k not in skip)
    usage, cli = _usage(cfg, out.name, base_model, method, lora)
    gallery = "\n".join(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in samples)
    body = f"""# {out.name}

{method.value} fine-tune of `{base_model}`, trained with sd_demo (`python -m sd_demo train`).
{f"Trigger word: `{cfg.trigger}`." if cfg.trigger else ""}

## Use

```python
from diffusers import DiffusionPipeline
{usage}
```

or `{cli}`.
{"The `" + out.name + ".safetensors` file is the same LoRA in kohya format for A1111 and ComfyUI." if lora else ""}

## Training

{f"Preset `{preset.preset}`; the values it set are marked." if preset else ""}

| parameter | value | from |
|---|---|---|
{rows}

Final training loss: {f"{final_loss:.4f}" if final_loss is not None else "n/a"}

## Samples

{gallery or "(no validation prompt was given)"}
"""
    path = out / "README.md"
    path.write_text(card_text(meta, body))
    return path


def _usage(cfg: TrainConfig, name: str, base_model: str, method: Method, lora: bool) -> tuple[str, str]:
    """Python (diffusers) and command-line lines that use the result: an adapter on its base model, or the model."""
    if method == Method.FULL or (method == Method.DREAMBOOTH and cfg.dreambooth_full):
        return (f'pipe = DiffusionPipeline.from_pretrained("{name}")',
                f'python -m sd_demo generate --model {name} --prompt "..."')
    lines = [f'pipe = DiffusionPipeline.from_pretrained("{base_model}")']
    if lora:
        lines.append(f'pipe.load_lora_weights("{name}")')
    if method == Method.TEXTUAL_INVERSION or cfg.trigger_token:  # the trigger's embedding
        lines.append(f'pipe.load_textual_inversion("{name}")')
    example = f"a {cfg.trigger}" if cfg.trigger else "..."
    return "\n".join(lines), f'python -m sd_demo generate --model {base_model} --lora {name} --prompt "{example}"'


def card_text(meta: dict, body: str) -> str:
    """A Hub model card: YAML front matter (the Hub reads license, tags, widget settings from it), then markdown."""
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n{body}"
