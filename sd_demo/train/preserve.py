"""Output preservation (ai-toolkit's "differential output preservation"): a self-distillation regulariser for LoRAs.

A LoRA trained on a dozen images of one new concept learns to draw that concept for every prompt (on the embedded
model a plain LoRA on 12 bars drew every object as a bar: ordinary shape accuracy 84 -> 9 %), because nothing in
its data says what sets the concept apart. DreamBooth's prior preservation answers with class images the user
supplies or the base model generates first; this needs neither. Each micro-batch, at the instance batch's timesteps
and on its noisy latents (on the embedded model: each prompt's own rendered world scene under the batch's noise), the
adapter is also asked other prompts (not the trigger's; a fifth of them the empty prompt that CFG subtracts) and
pulled towards what the base model (the same UNet with its adapters disabled) predicts for them:

    loss += preserve * MSE(ε_adapter(x_t, t, c_other), ε_base(x_t, t, c_other))

so the adapter changes the model only where the trigger is. The base prediction needs no second copy of the
weights (the adapter is switched off for one no-grad pass) and no images.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import Method, TrainConfig
from .data import trigger_pattern

AUTO_PROMPTS = 512  # the embedded model's automatic pool: every (shape, colour, background) triple about twice
# The empty prompt joins every pool as a fifth of it: classifier-free guidance subtracts the model's answer to "",
# and an adapter left free there drifts towards the concept, which guidance then pushes every prompt away from.
EMPTY_SHARE = 0.25


def embedded_scenes(n: int = AUTO_PROMPTS, seed: int = 0) -> tuple[list[str], list]:
    """Random scenes over the embedded model's whole world and a random caption of each (all styles, so the
    phrasings the model knows, with and without size and position, all keep their meaning)."""
    from ..shapes.captions import random_caption
    from ..shapes.world import Split, sample_scenes

    rng = np.random.default_rng(seed + 1)  # phrasing draws apart from the scenes' own seed
    scenes = sample_scenes(n, seed, Split.ALL)
    return [random_caption(s, rng) for s in scenes], scenes


def embedded_prompts(n: int = AUTO_PROMPTS, seed: int = 0) -> list[str]:
    return embedded_scenes(n, seed)[0]


def preservation_prompts(cfg: TrainConfig, embedded: bool, captions: list[str]) -> list[str]:
    """--preserve-prompts' lines; else the embedded world's captions; else the instance captions with the trigger
    replaced by --class-word (what ai-toolkit does), so only the trigger's meaning may move."""
    if cfg.preserve_prompts:
        path = Path(cfg.preserve_prompts)
        if not path.is_file():
            raise ValueError(f"preserve_prompts: '{path}' is not a file; give a .txt with one prompt per line")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"preserve_prompts: '{path}' has no prompts; write one prompt per line")
        return lines
    if embedded:
        return embedded_prompts(seed=cfg.seed)
    if cfg.class_word:
        from .loop import class_prompts  # lazily: loop imports this module

        return class_prompts(cfg, captions)
    raise ValueError("preserve: on this model give --preserve-prompts (a .txt, one prompt per line), or --trigger "
                     "with --class-word (the instance captions, the trigger replaced by that word)")


@contextlib.contextmanager
def adapters_off(modules: list[torch.nn.Module]) -> Iterator[None]:
    """The base model: every peft adapter disabled, re-enabled even on error. diffusers' and transformers' models
    both offer disable_adapters / enable_adapters; the modules are the unwrapped ones (accelerate's DDP or
    torch.compile wrappers share their parameters and layers, so the switch reaches them too)."""
    peft = [m for m in modules if getattr(m, "peft_config", None)]
    for m in peft:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in peft:
            m.enable_adapters()


@dataclass
class Preserver:
    weight: float
    prompts: list[str]
    per_batch: int  # preservation prompts per micro-batch, on its first per_batch noisy latents; 0 = one per image
    unet: torch.nn.Module  # unwrapped: the no-grad base pass needs neither DDP's hooks nor a compiled graph
    adapters: list[torch.nn.Module]  # the modules whose peft adapters are switched off for the base pass
    scenes: list | None = None  # embedded model: the world scene behind each prompt, preserved on its own latents
    vae: torch.nn.Module | None = None
    resolution: int = 128
    swap: int = 0  # rows per micro-batch on the instance latents, the trigger replaced by one of swap_words
    swap_weight: float = 1.0  # a swap row's weight in the preservation loss against a scene row's
    swap_words: tuple[str, ...] = ()
    trigger: re.Pattern | None = None

    def __post_init__(self):
        self._latents: dict[int, torch.Tensor] = {}
        self._swapped = 0  # swap rows of the last inputs() (the last rows): the next loss() weighs them

    @torch.no_grad()
    def _scene_latent(self, i: int) -> torch.Tensor:
        """The VAE latent (4, h, w) of prompt i's rendered scene, encoded once, when first drawn."""
        if i not in self._latents:
            from ..shapes.world import render
            from .batches import to_tensor

            x = to_tensor(render(self.scenes[i], self.resolution)).unsqueeze(0).to(self.vae.device, self.vae.dtype)
            self._latents[i] = (self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor)[0].float()
        return self._latents[i]

    def inputs(self, g: torch.Generator, noisy: torch.Tensor, t: torch.Tensor, cond: dict, text,
               noise: torch.Tensor | None = None, noise_sched=None, captions: list[str] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(noisy latents, timesteps, UNet conditioning) of the preservation prompts: the first ``per_batch`` of
        the batch's timesteps, each with a prompt drawn from ``g`` (after the batch's own draws: --resume stays
        exact), on the batch's noisy latents; on the embedded model on the prompt's own scene under the batch's
        noise. Why: on the instance latents only, the base model's answer at small t is "denoise this bar",
        whatever the prompt, so nothing kept a square a square (ordinary shape 81 -> 67 %); on the scenes' latents
        the whole denoising path of ordinary prompts is kept."""
        n = min(self.per_batch or noisy.shape[0], noisy.shape[0])
        picks = torch.randint(len(self.prompts), (n,), generator=g).tolist()
        x, tt = noisy[:n], t[:n]  # (n, 4, h, w), (n,)
        if self.scenes is not None and noise is not None:
            x0 = torch.stack([self._scene_latent(i) for i in picks]).to(noisy)
            if x0.shape == x.shape:  # same size as the batch (no aspect buckets)
                x = noise_sched.add_noise(x0, noise[:n], tt)
        prompts = [self.prompts[i] for i in picks]
        k = min(self.swap, noisy.shape[0]) if captions and self.trigger is not None else 0
        rows = []
        if k:  # the instance images' own noisy latents under another word: the concept's look must not follow it
            words = torch.randint(len(self.swap_words), (k,), generator=g).tolist()
            for i, (w, c) in enumerate(zip(words, captions[:k])):
                swapped, found = self.trigger.subn(self.swap_words[w], c)
                if found:  # a caption without the trigger (or dropped to "") would pull the concept itself back
                    prompts.append(swapped)
                    rows.append(i)
            x, tt = torch.cat([x, noisy[rows]]), torch.cat([tt, t[rows]])
        self._swapped = len(rows)  # set for every batch: one without swap rows must not weigh its scene rows
        return x, tt, _conditioning(text(prompts), cond, list(range(n)) + rows)

    @torch.no_grad()
    def base(self, x: torch.Tensor, t: torch.Tensor, cond: dict, accelerator) -> torch.Tensor:
        """The base model's prediction (adapters off): what the adapter's answer to these prompts is pulled to."""
        with adapters_off(self.adapters), accelerator.autocast():
            return self.unet(x, t, **cond).sample

    def loss(self, pred: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``preserve * mean over rows of w_row * MSE_row(adapter, base)``, w = ``swap_weight`` for the swap rows
        (the last ones) and 1 for the rest; the adapter's ``pred`` comes from the training UNet, in the same
        forward pass as the instance batch (one call instead of two: a step is 0.1 s shorter on the embedded
        model)."""
        per_row = F.mse_loss(pred.float(), base.float(), reduction="none").flatten(1).mean(1)  # (rows,)
        w = torch.ones_like(per_row)
        if self._swapped:
            w[-self._swapped:] = self.swap_weight
        return self.weight * (w * per_row).mean()


def joined(a: dict, b: dict) -> dict:
    """Two UNet conditionings as one batch (``a``'s rows first)."""
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {k: torch.cat([v, b["added_cond_kwargs"][k]])
                                    for k, v in a["added_cond_kwargs"].items()}
    return out


def _conditioning(prompt_cond: dict, batch_cond: dict, rows: list[int]) -> dict:
    """UNet kwargs for the preservation prompts; SDXL keeps the batch images' (``rows``) size / crop
    micro-conditioning."""
    if "added_cond_kwargs" not in batch_cond:
        return prompt_cond
    time_ids = batch_cond["added_cond_kwargs"]["time_ids"][rows]
    return {"encoder_hidden_states": prompt_cond["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": prompt_cond["text_embeds"], "time_ids": time_ids}}


def build(cfg: TrainConfig, model, trainable, captions: list[str]) -> Preserver | None:
    """The run's Preserver, or None when --preserve is 0 (then no draw is made: runs without it are unchanged)."""
    if not cfg.preserve:
        return None
    if not trainable.lora:  # config.validate refuses it first; this guards direct callers
        raise ValueError(f"preserve: is for LoRA training (--method lora or dreambooth), not {Method(cfg.method).value}")
    embedded = model.ref.source == "embedded"
    scenes = None
    if embedded and not cfg.preserve_prompts:
        prompts, scenes = embedded_scenes(seed=cfg.seed)
    else:
        prompts = preservation_prompts(cfg, embedded, captions)
    empty = max(1, round(EMPTY_SHARE * len(prompts)))
    prompts += [""] * empty
    if scenes is not None:  # the empty prompt on scenes too: the unconditional answer along ordinary paths
        scenes = scenes + scenes[:empty]
    if cfg.preserve_swap and not cfg.trigger:
        raise ValueError("preserve_swap: needs a trigger word (--trigger, or a made-up word the captions share)")
    words = swap_words(cfg, embedded) if cfg.preserve_swap else ()
    return Preserver(cfg.preserve, prompts, cfg.preserve_batch, trainable.modules["unet"],
                     list(trainable.modules.values()), scenes, model.pipe.vae, cfg.resolution, cfg.preserve_swap or 0,
                     1.0 if cfg.preserve_swap_weight is None else cfg.preserve_swap_weight, words,
                     trigger_pattern(cfg.trigger) if words and cfg.trigger else None)


def swap_words(cfg: TrainConfig, embedded: bool) -> tuple[str, ...]:
    """The words a --preserve-swap row puts in the trigger's place: --class-word's, else the embedded model's
    shapes."""
    if cfg.class_word:
        return tuple(w.strip() for w in cfg.class_word.split(",") if w.strip())
    if embedded:
        from ..shapes.vocab import Shape

        return tuple(s.value for s in Shape)
    raise ValueError("preserve_swap: on this model give --class-word (the words put in the trigger's place)")
