"""The README.md model card of a training result, in the Hub's format (YAML front matter + markdown)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .config import TrainConfig

if TYPE_CHECKING:
    from ..models import ModelRef

_HPARAMS = ("method", "steps", "lr", "lr_schedule", "warmup_steps", "rank", "alpha", "resolution", "batch",
            "grad_accum", "seed", "snr_gamma", "snr_weighting", "noise_offset", "train_text_encoder", "caption_dropout",
            "random_flip", "buckets", "mixed_precision", "gradient_checkpointing", "target_modules", "num_class_images",
            "preserve", "preserve_batch", "preserve_swap", "preserve_swap_weight", "trigger_token", "token_lr", "init_word",
            "num_vectors")


def write_card(out: Path, cfg: TrainConfig, base: ModelRef, samples: list[Path], final_loss: float | None,
               license: str = "other", preset=None) -> Path:
    """``preset`` (presets.Resolved): the card names the preset and marks the values that came from it. The base
    model is named by its Hub id, never by a path of this machine; ``base_model`` (the Hub's link to the base) is
    set only when there is a Hub id."""
    from .methods import method_spec

    spec = method_spec(cfg)
    base_model = base.public_name
    meta = {
        **({"base_model": base.hub_id} if base.hub_id else {}),
        "library_name": "diffusers",
        "license": license,
        "tags": ["text-to-image", "stable-diffusion", "diffusers", "sd_demo", *(["lora"] if spec.lora else []),
                 *([spec.tag] if spec.tag else [])],
        "inference": True,
    }
    if cfg.trigger:
        meta["instance_prompt"] = cfg.trigger
    if samples and cfg.validation_prompt:  # the Hub shows them on the model page (its widget convention)
        meta["widget"] = [{"text": cfg.validation_prompt, "output": {"url": p.relative_to(out).as_posix()}}
                          for p in samples]
    hp, skip = asdict(cfg), spec.card_skips()
    from_preset = preset.from_preset if preset else {}
    rows = "\n".join(f"| {k} | {hp[k]} |{' preset' if k in from_preset else ''} |" for k in _HPARAMS if k not in skip)
    usage, cli = spec.usage(out.name, base_model, cfg.trigger)
    gallery = "\n".join(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in samples)
    body = f"""# {out.name}

{cfg.method} fine-tune of `{base_model}`, trained with sd_demo (`python -m sd_demo train`).
{f"Trigger word: `{cfg.trigger}`." if cfg.trigger else ""}

## Use

```python
from diffusers import DiffusionPipeline
{usage}
```

or `{cli}`.
{"The `" + out.name + ".safetensors` file is the same LoRA in kohya format for A1111 and ComfyUI." if spec.lora else ""}

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


def card_text(meta: dict, body: str) -> str:
    """A Hub model card: YAML front matter (the Hub reads license, tags, widget settings from it), then markdown."""
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n{body}"
