"""The README.md model card of a training result, in the Hub's format (YAML front matter + markdown)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from .config import Method, TrainConfig

_HPARAMS = ("method", "steps", "lr", "lr_schedule", "warmup_steps", "rank", "alpha", "resolution", "batch",
            "grad_accum", "seed", "snr_gamma", "noise_offset", "train_text_encoder", "caption_dropout", "random_flip",
            "buckets", "mixed_precision")


def write_card(out: Path, cfg: TrainConfig, base_model: str, samples: list[Path], final_loss: float | None,
               license: str = "other") -> Path:
    method = Method(cfg.method)
    lora = method in (Method.LORA, Method.DREAMBOOTH)
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
    rows = "\n".join(f"| {k} | {hp[k]} |" for k in _HPARAMS if not (k in ("rank", "alpha") and not lora))
    usage = (f'pipe.load_lora_weights("{out.name}")' if lora else f'pipe = DiffusionPipeline.from_pretrained("{out.name}")')
    gallery = "\n".join(f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in samples)
    body = f"""# {out.name}

{method.value} fine-tune of `{base_model}`, trained with sd_demo (`python -m sd_demo train`).
{f"Trigger word: `{cfg.trigger}`." if cfg.trigger else ""}

## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{base_model}")
{usage}
```

or `python -m sd_demo generate --model {base_model} {'--lora ' + out.name if lora else ''} --prompt "..."`.
{"The `" + out.name + ".safetensors` file is the same LoRA in kohya format for A1111 and ComfyUI." if lora else ""}

## Training

| parameter | value |
|---|---|
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
