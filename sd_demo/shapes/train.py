"""Train the embedded shapes model from nothing: ``python -m sd_demo.shapes train --out DIR [--max-minutes 110]``.

Stages (each a small function): make_dataset -> make_tokenizer -> train_vae -> pretrain_text_encoder ->
encode_latents -> train_unet (a main stage, then a detail stage) -> export. Every component is the real Stable
Diffusion architecture at small scale (AutoencoderKL with 8x downsampling and 4 latent channels, CLIPTextModel +
CLIP BPE tokenizer, UNet2DConditionModel with cross-attention, SD's scaled_linear 1000-step schedule), saved in
diffusers layout so ``StableDiffusionPipeline.from_pretrained`` and the app's loader read it, and the Training tab's
"full" method can continue training it.

Seeded (torch + numpy). Every stage runs a fixed step count (by default ``--unet-steps 14000`` of batch 24: about
115 min on a quiet 2-core CPU), so a busy machine makes the run longer, not different. ``--unet-steps 0`` instead
trains the UNet until the time budget (``--max-minutes``) is spent, its learning-rate schedule following the time.
``--device cuda`` runs the same stages on a GPU; ``--init DIR`` continues from a model. The training set is the train
split only: held-out (shape, colour, background) triples never appear.
"""
from __future__ import annotations

import copy
import json
import os
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .captions import parse_prompt, random_caption
from .vocab import Color, Position, Shape, Size
from .world import Scene, render, sample_scenes

# SD's noise schedule (scaled_linear betas 0.00085..0.012 over 1000 steps) with "trailing" timesteps so a
# sampler's first step is t = 999. The prediction type is a TrainConfig choice: v-prediction (as SD 2.x) is the
# default because its loss at high noise is an x0 loss, the only place where the prompt alone decides the layout;
# with epsilon prediction that loss is ~SNR (0.005 at t = 999) times smaller and the models ignored position words.
# v-prediction alone did not teach position (the seed placed the object); with the text-encoder stage below the
# 110-min CPU run of 2026-11-26 put 95 % of held-out objects where the prompt said (CFG 4).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing")
# Tried and kept as an option (--zero-snr): zero terminal SNR (Lin et al. 2023), always with v-prediction. In a
# short run it drew worse shapes (often two objects) and did not fix position either.
ZERO_SNR_SCHEDULE = dict(SCHEDULE, prediction_type="v_prediction", rescale_betas_zero_snr=True)
IMAGE_SIZE = 128
LATENT_SIZE = IMAGE_SIZE // 8  # (B, 4, 16, 16)


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    scenes: int = 12000  # rendered training scenes (train split), encoded to latents once
    max_minutes: float = 110.0  # with --unet-steps 0: the whole run, export included (the UNet gets what is left)
    # --- stage A: VAE
    # A fixed step count (7 min on a quiet 2-core CPU, 1.3 / 255 mean error) keeps the VAE the same however busy
    # the machine is; the minutes are only a cap.
    vae_minutes: float = 15.0
    vae_steps: int = 5000
    vae_batch: int = 16
    vae_crop: int = 48  # px; crops are centred near the object most of the time (edges are what is hard)
    vae_lr: float = 2e-3
    vae_latent_noise: float = 0.05  # relative to the latents' std, added before decoding
    vae_kl: float = 1e-6  # SD's KL weight: latents stay a plain autoencoder's, scaled by 1/std afterwards
    # --- stage B: text encoder + UNet
    # The text encoder first learns to name the attributes a caption states (shape, colours, size, position, or
    # "not said") from its pooled output, a few seconds of supervised training; diffusion then starts from features
    # that already separate the attributes instead of from noise. 0 skips this (the text encoder starts random).
    te_steps: int = 300
    te_lr: float = 1e-3
    # Share of captions whose shape word is swapped for a made-up word ("a red zqvo on the left ..."), labelled
    # "shape not said". Words outside the caption language are spelled in byte pieces whose embeddings would
    # otherwise never train; a random-embedding trigger word then garbled the whole prompt (colours too), and
    # LoRA / DreamBooth could not bind a new concept to it. With this the model reads an unknown word as "some
    # object" and keeps the rest of the prompt, as a web-trained SD model does with a rare trigger. They cost no
    # quality: the same recipe with 0 scored the same on held-out prompts (shape 75.8 vs 75.0 %, colour 83.6 vs
    # 86.7 % at CFG 4; runs v6 and v5).
    unknown_word_share: float = 0.04
    te_lr_scale: float = 0.0  # the text encoder's learning rate during diffusion, as a share of --lr; 0 freezes it
    # Steps, not minutes: in session 5 a time budget on a shared CPU gave the main stage 7045 steps instead of
    # ~9000 and a visibly worse model. 0: train until the time budget (--max-minutes) is spent.
    # More, smaller steps: 14000 of batch 24 (0.45 s each, ~114 min in all) beat 11000 of batch 32 (0.54 s,
    # ~109 min): held-out shape 82.0 vs 77.3 %, colour 92.2 vs 88.3 % (DPM++ 2M, CFG 3; runs v7 and v6).
    unet_steps: int = 14000
    batch: int = 24
    lr: float = 8e-4
    warmup: int = 100
    cond_drop: float = 0.1  # share of empty captions, so classifier-free guidance works
    ema: float = 0.998
    snr_gamma: float = 5.0  # min-SNR loss weighting (Hang et al. 2023): ~3x faster convergence
    offset_noise: float = 0.05  # per-channel noise offset: the model cannot read the background from x_T's mean
    checkpoint_minutes: float = 10.0
    log_every: int = 20
    # architecture
    vae_channels: tuple = (16, 32, 64, 64)
    # 3 levels (16, 8, 4 px latents). On this CPU a batch-32 step costs 0.64 s against 0.46 s for a 4-level
    # (32, 64, 128, 128) UNet, and only this width reached the shape bar in earlier runs.
    unet_channels: tuple = (64, 128, 192)
    unet_layers: int = 1
    # Channels per attention head. diffusers' default for this width (8 heads) gives 8-channel heads, which CPU
    # attention kernels run badly: 32-channel heads make a batch-32 step 0.49 s instead of 0.67 s, same weights.
    unet_head_dim: int = 32
    unet_norm_groups: int = 32
    text_hidden: int = 128
    text_layers: int = 3
    threads: int = 2
    # Continue from a saved model (e.g. to teach position at high noise) instead of training from nothing:
    init: str = ""  # diffusers folder; its VAE, tokenizer and scaling_factor are kept
    high_t_share: float = 0.2  # share of samples whose timestep is drawn from [high_t, 999] (layout is set there)
    high_t: int = 700
    # The detail stage: the last share of the UNet budget (time, or --unet-steps) restarts from the EMA weights
    # with a fresh optimizer at --detail-lr, every timestep weighted equally and no high-noise oversampling.
    # Min-SNR-5 down-weights the low-noise steps where outlines are drawn; in run-v3 a 22-minute continuation like
    # this lifted held-out shape accuracy from 73 to 86 % at CFG 4 (colour 88 -> 93). 0 turns it off.
    detail_share: float = 0.22
    detail_lr: float = 2e-4
    detail_warmup: int = 50
    x0_weight_cap: float = 0.0  # > 0: weight the epsilon loss by clamp(1 / SNR, 1, cap), i.e. like an x0 loss at
    #                              high noise, where the prompt alone decides the layout (position)
    # The UNet's target: v (SD 2.x) or epsilon (SD 1.x); the exported scheduler config says which.
    prediction: str = field(default="v_prediction", metadata={"choices": ["v_prediction", "epsilon"]})
    zero_snr: bool = False  # train on ZERO_SNR_SCHEDULE (v-prediction) instead of SCHEDULE
    device: str = "cpu"  # the recipe targets the 2-core CPU; 'cuda' runs the same stages on a GPU
    start: float = field(default_factory=time.time, repr=False)

    def minutes(self) -> float:
        return (time.time() - self.start) / 60


def log(cfg: TrainConfig, msg: str) -> None:
    print(f"[{cfg.minutes():6.1f} min] {msg}", flush=True)


# --- data ------------------------------------------------------------------------------------------------------

def make_dataset(n: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """``n`` train-split scenes and their renders as uint8 (n, 128, 128, 3)."""
    scenes = sample_scenes(n, seed, "train")
    images = np.stack([np.asarray(render(s, IMAGE_SIZE)) for s in scenes])
    return scenes, images


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --- models ----------------------------------------------------------------------------------------------------

def make_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),  # 4 blocks -> downsampling 8
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        # No attention in the mid block: the VAE is fully convolutional, so it trains on crops (16x cheaper than
        # whole 128 px images on 2 CPU cores) and works the same on whole images.
        mid_block_add_attention=False,
    )


def make_text_encoder(cfg: TrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu",
    ))


def make_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=cfg.unet_layers,
        cross_attention_dim=cfg.text_hidden, norm_num_groups=cfg.unet_norm_groups,
        # diffusers' attention_head_dim is, for this class, the number of heads per block
        attention_head_dim=tuple(max(1, c // cfg.unet_head_dim) for c in cfg.unet_channels),
    )


def schedule_config(cfg: TrainConfig) -> dict:
    if cfg.prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction: unknown '{cfg.prediction}'; use epsilon or v_prediction")
    return dict(ZERO_SNR_SCHEDULE) if cfg.zero_snr else dict(SCHEDULE, prediction_type=cfg.prediction)


def make_noise_scheduler(cfg: TrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**schedule_config(cfg))


# --- stage A: VAE ----------------------------------------------------------------------------------------------

def random_crops(images: np.ndarray, scenes, crop: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` crops (n, crop, crop, 3): 75 % around the object's centre (+- crop/2), the rest anywhere."""
    idx = rng.integers(len(images), size=n)
    out = np.empty((n, crop, crop, 3), dtype=np.uint8)
    size = images.shape[1]
    for k, i in enumerate(idx):
        if rng.random() < 0.75:
            cx, cy = (int(v * size) for v in scenes[i].obj.center)
            x = cx - crop // 2 + int(rng.integers(-crop // 2, crop // 2 + 1))
            y = cy - crop // 2 + int(rng.integers(-crop // 2, crop // 2 + 1))
        else:
            x, y = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        x, y = min(max(x, 0), size - crop), min(max(y, 0), size - crop)
        out[k] = images[i, y:y + crop, x:x + crop]
    return out


def train_vae(cfg: TrainConfig, scenes, images: np.ndarray):
    """L1 + MSE reconstruction with a tiny KL term; flat-colour scenes need only a small autoencoder."""
    vae = make_vae(cfg).to(cfg.device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed + 1)
    budget = cfg.vae_minutes * 60
    t0 = time.time()
    step, avg = 0, None
    while step < cfg.vae_steps and time.time() - t0 < budget:
        # The schedule follows steps only, so a busy machine gives the same VAE (it once annealed early when the
        # CPU was shared); the time budget is a cap for pathological slowness, not a second clock.
        frac = min(1.0, step / cfg.vae_steps)
        for g in opt.param_groups:  # warmup then cosine over the stage's steps
            g["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = to_tensor(random_crops(images, scenes, cfg.vae_crop, cfg.vae_batch, rng)).to(cfg.device)  # (B,3,c,c)
        post = vae.encode(x).latent_dist
        z = post.mean  # (B, 4, crop/8, crop/8)
        # Decode the mean plus a little noise rather than post.sample(): the posterior starts at std 1 and a tiny
        # KL weight takes thousands of steps to shrink it, while this trains as fast as a plain autoencoder and
        # still teaches the decoder to tolerate the small latent errors a diffusion model makes.
        z = z + cfg.vae_latent_noise * z.detach().std() * torch.randn_like(z)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % cfg.log_every == 0:
            log(cfg, f"vae step {step} loss {avg:.4f} {(time.time() - t0) / step:.2f} s/step")
    log(cfg, f"vae done: {step} steps, loss {avg:.4f}")
    vae.train_steps = step
    return vae.eval()


@torch.no_grad()
def encode_latents(cfg: TrainConfig, vae, images: np.ndarray, batch: int = 128, keep_scale: bool = False
                   ) -> torch.Tensor:
    """Posterior means of all images, (N, 4, 16, 16), times the scaling factor (1 / std), which goes in the
    VAE config as SD's ``scaling_factor``."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i:i + batch]).to(cfg.device)).latent_dist.mean.cpu())
    latents = torch.cat(out)
    scale = float(vae.config.scaling_factor) if keep_scale else float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    log(cfg, f"encoded {len(latents)} latents; scaling_factor {scale:.4f}")
    return latents * scale


@torch.no_grad()
def vae_check(vae, images: np.ndarray, device: str = "cpu") -> float:
    """Mean absolute reconstruction error (0..255) on a few images."""
    x = to_tensor(images[:32]).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)


# --- stage B: text encoder -----------------------------------------------------------------------------------

ATTRIBUTE_ENUMS = dict(shape=Shape, color=Color, background=Color, size=Size, position=Position)


def unknown_word(rng: np.random.Generator) -> str:
    """A made-up lowercase word (3-8 letters) that the prompt parser does not read as any attribute."""
    while True:
        word = "".join(chr(97 + c) for c in rng.integers(26, size=int(rng.integers(3, 9))))
        if parse_prompt(word) == parse_prompt(""):
            return word


def caption_for_training(scene, rng: np.random.Generator, unknown_share: float) -> str:
    """A random caption; with probability ``unknown_share`` its shape word is replaced by a made-up word."""
    text = random_caption(scene, rng)
    if unknown_share > 0 and rng.random() < unknown_share:
        text = re.sub(rf"\b{scene.obj.shape.value}\b", unknown_word(rng), text, count=1)
    return text


def attribute_labels(texts: list[str]) -> dict[str, torch.Tensor]:
    """{attribute: (B,) class indices} read back from the captions by the prompt parser; the last class of each
    attribute means "the caption does not say" (canonical captions leave size and position open)."""
    specs = [parse_prompt(t) for t in texts]
    return {name: torch.tensor([len(enum) if getattr(sp, name) is None else list(enum).index(getattr(sp, name))
                                for sp in specs]) for name, enum in ATTRIBUTE_ENUMS.items()}


def pretrain_text_encoder(cfg: TrainConfig, scenes, tokenizer, te=None):
    """Teach the text encoder to state a caption's attributes: linear heads on its pooled output (the EOS token,
    as CLIP's text embedding) classify each attribute. Returns (text encoder, heads); the heads are only for
    measuring. The UNet then reads per-token features that already separate shape, colours, size and position, so
    diffusion does not first have to discover them through the UNet: in a 1000-step run the position words moved
    the object (top / bottom for 6 of 6 seeds), where jointly trained encoders left position to the seed even after
    11k steps."""
    te = (te or make_text_encoder(cfg, tokenizer)).to(cfg.device).train()
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(cfg.text_hidden, len(enum) + 1)
                                 for name, enum in ATTRIBUTE_ENUMS.items()}).to(cfg.device)
    params = list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.te_lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed + 5)
    # Judged on captions of held-out scenes: (shape, colour, background) triples the encoder never read.
    check_rng = np.random.default_rng(cfg.seed + 6)  # its own stream: the training captions stay the same
    check = [random_caption(s, check_rng) for s in sample_scenes(256, cfg.seed + 6, "heldout")]
    t0 = time.time()
    for step in range(1, cfg.te_steps + 1):
        texts = [caption_for_training(scenes[i], rng, cfg.unknown_word_share)
                 for i in rng.integers(len(scenes), size=64)]
        logits = attribute_logits(te, heads, tokenizer, texts)
        labels = attribute_labels(texts)
        loss = sum(F.cross_entropy(logits[k], labels[k].to(cfg.device)) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.te_steps:
            acc = attribute_accuracy(te, heads, tokenizer, check)
            log(cfg, f"text encoder step {step} loss {loss.item():.4f} held-out caption accuracy {acc} "
                     f"{(time.time() - t0) / step:.2f} s/step")
    return te.eval(), heads.eval()


def attribute_logits(te, heads, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    device = next(te.parameters()).device
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    pooled = te(ids).pooler_output  # (B, hidden)
    return {name: head(pooled) for name, head in heads.items()}


@torch.no_grad()
def attribute_accuracy(te, heads, tokenizer, texts: list[str]) -> dict[str, float]:
    """Share of ``texts`` whose attributes (or "not said") the heads read right, per attribute."""
    logits = attribute_logits(te, heads, tokenizer, texts)
    labels = attribute_labels(texts)
    return {k: round(float((logits[k].argmax(1).cpu() == labels[k]).float().mean()), 3) for k in heads}


# --- stage C: UNet ------------------------------------------------------------------------------

class Captioner:
    """Random captions (all styles, canonical included) for scene indices, tokenized with a cache."""

    def __init__(self, scenes, tokenizer, seed: int, drop: float, unknown_share: float = 0.0):
        self.scenes, self.tok, self.drop, self.unknown = scenes, tokenizer, drop, unknown_share
        self.rng = np.random.default_rng(seed)
        self.cache: dict[str, list[int]] = {}

    def ids(self, idx: np.ndarray) -> torch.Tensor:
        texts = ["" if self.rng.random() < self.drop else caption_for_training(self.scenes[i], self.rng, self.unknown)
                 for i in idx]
        missing = [t for t in set(texts) if t not in self.cache]
        if missing:
            enc = self.tok(missing, padding="max_length", max_length=self.tok.model_max_length, truncation=True)
            self.cache.update(zip(missing, enc.input_ids))
        return torch.tensor([self.cache[t] for t in texts])  # (B, 77)


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction; for v-prediction
    min(SNR + 1, gamma + 1) / (SNR + 1), which keeps weight 1 at the pure-noise end (SNR 0)."""
    ac = scheduler.alphas_cumprod.to(t.device)[t]
    snr = ac / (1 - ac).clamp(min=1e-8)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma + 1) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


@dataclass
class Stage:
    """One UNet training stage: its learning rate, loss weighting, timestep sampling and budget."""
    name: str
    lr: float
    warmup: int
    snr_gamma: float  # 0: every timestep weighted equally
    high_t_share: float
    seconds: float = 0.0  # time budget, used when steps is 0
    steps: int = 0
    seed: int = 0


def unet_stages(cfg: TrainConfig, seconds: float) -> list[Stage]:
    """The main stage, then (``detail_share`` > 0) the detail stage on the rest of the budget."""
    share = min(max(cfg.detail_share, 0.0), 1.0)
    detail_steps = round(cfg.unet_steps * share)
    stages = [Stage("main", cfg.lr, cfg.warmup, cfg.snr_gamma, cfg.high_t_share, seconds * (1 - share),
                    cfg.unet_steps - detail_steps, cfg.seed),
              Stage("detail", cfg.detail_lr, cfg.detail_warmup, 0.0, 0.0, seconds * share, detail_steps,
                    cfg.seed + 10)]
    return [s for s in stages if (s.steps if cfg.unet_steps else s.seconds) > 0]


def train_unet(cfg: TrainConfig, scenes, latents: torch.Tensor, tokenizer, vae, export_dir: Path, init=None):
    """Joint text-encoder + UNet training, stage after stage; each stage starts from the previous one's EMA."""
    models = init if init else (make_unet(cfg), make_text_encoder(cfg, tokenizer))
    budget = cfg.max_minutes * 60 - (time.time() - cfg.start) - 90  # 90 s kept for the export
    info = {"unet_steps": 0}
    for stage in unet_stages(cfg, budget):
        log(cfg, f"unet stage '{stage.name}': lr {stage.lr:g}, min-SNR gamma {stage.snr_gamma or 'off'}, "
                 + (f"{stage.steps} steps" if cfg.unet_steps else f"{stage.seconds / 60:.1f} min"))
        *models, steps, loss = train_unet_stage(cfg, stage, scenes, latents, tokenizer, vae, export_dir, *models)
        info["unet_steps"] += steps
        info[f"{stage.name}_steps"], info["final_loss"] = steps, loss
    return (*models, info)


def train_unet_stage(cfg: TrainConfig, stage: Stage, scenes, latents: torch.Tensor, tokenizer, vae,
                     export_dir: Path, unet, te):
    """One stage (epsilon or v target, per the schedule): returns the EMA copies, the step count and the loss."""
    train_te = cfg.te_lr_scale > 0
    unet, te = unet.to(cfg.device).train(), te.to(cfg.device).train(train_te).requires_grad_(train_te)
    latents = latents.to(cfg.device)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + (list(te.parameters()) if train_te else [])
    groups = [dict(params=list(unet.parameters()), scale=1.0)]
    if train_te:
        groups.append(dict(params=list(te.parameters()), scale=cfg.te_lr_scale))
    opt = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=0.01)
    sched = make_noise_scheduler(cfg)
    captions = Captioner(scenes, tokenizer, stage.seed + 2, cfg.cond_drop, cfg.unknown_word_share)
    rng = np.random.default_rng(stage.seed + 3)
    gen = torch.Generator().manual_seed(stage.seed + 4)
    # Progress drives the cosine schedule: steps done / the stage's steps, or (default) time spent / time budget,
    # so a machine that slows down (shared CPU) still anneals the learning rate and stops cleanly on time.
    t0 = last_ckpt = time.time()
    step, avg, progress = 0, None, 0.0
    while progress < 1.0:
        lr_scale = min(1.0, (step + 1) / stage.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = stage.lr * lr_scale * g["scale"]
        idx = rng.integers(len(latents), size=cfg.batch)
        x0 = latents[torch.from_numpy(idx).to(cfg.device)]  # (B, 4, 16, 16)
        noise = torch.randn(x0.shape, generator=gen)
        noise += cfg.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        if stage.high_t_share > 0:
            high = torch.rand(x0.shape[0], generator=gen) < stage.high_t_share
            t = torch.where(high, torch.randint(cfg.high_t, sched.config.num_train_timesteps, t.shape, generator=gen), t)
        noise, t = noise.to(cfg.device), t.to(cfg.device)
        xt = sched.add_noise(x0, noise, t)
        with torch.set_grad_enabled(train_te):
            text = te(captions.ids(idx).to(cfg.device))[0]  # (B, 77, hidden)
        pred = unet(xt, t, encoder_hidden_states=text).sample
        target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        weight = min_snr_weights(sched, t, stage.snr_gamma) if stage.snr_gamma > 0 else torch.ones_like(per)
        if cfg.x0_weight_cap > 0:
            ac = sched.alphas_cumprod.to(t.device)[t]
            weight = weight * ((1 - ac) / ac).clamp(1.0, cfg.x0_weight_cap)
        loss = (per * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        if train_te:
            _ema_update(ema_te, te, decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        spent = time.time() - t0
        progress = step / stage.steps if cfg.unet_steps else spent / stage.seconds
        if step % cfg.log_every == 0:
            eta = spent / max(progress, 1e-9) * (1 - progress) / 60
            log(cfg, f"unet {stage.name} step {step} loss {avg:.4f} lr {stage.lr * lr_scale:.2e} "
                     f"{spent / step:.2f} s/step progress {progress:.1%} eta {eta:.1f} min")
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60 and progress < 1.0:
            export(export_dir / "checkpoint", vae, ema_te, tokenizer, ema_unet, {"step": step, "loss": avg},
                   schedule=schedule_config(cfg))
            last_ckpt = time.time()
            log(cfg, f"checkpoint at {stage.name} step {step} -> {export_dir / 'checkpoint'}")
    return ema_unet, ema_te, step, avg


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


# --- export ----------------------------------------------------------------------------------------------------

def export(out: Path, vae, text_encoder, tokenizer, unet, info: dict, fp16: bool = True,
           schedule: dict | None = None) -> Path:
    """Save a diffusers folder (safetensors; UNet and VAE fp16 by default to keep the model small) atomically:
    written to a temporary sibling, then renamed over ``out``. The text encoder stays fp32 (0.7 M parameters):
    transformers 5 keeps a stored dtype, and an fp16 encoder beside diffusers' fp32 UNet fails in a plain
    ``StableDiffusionPipeline.from_pretrained(...)(prompt)`` on a CPU."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = DPMSolverMultistepScheduler(**(schedule or SCHEDULE), algorithm_type="dpmsolver++", solver_order=2)
    dtype = torch.float16 if fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to("cpu", dtype), text_encoder=copy.deepcopy(text_encoder).to("cpu", torch.float32),
        tokenizer=tokenizer, unet=copy.deepcopy(unet).to("cpu", dtype), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    tok_dir = tmp / "tokenizer"
    for name in ("vocab.json", "merges.txt"):  # transformers 5 save_pretrained writes only tokenizer.json
        for src in (Path(tokenizer.name_or_path) / name, Path(tokenizer.name_or_path) / "tokenizer" / name):
            if src.exists() and not (tok_dir / name).exists():
                shutil.copy(src, tok_dir / name)
    published = {**info, "config": {k: portable(v) for k, v in info.get("config", {}).items()}}
    (tmp / "train_info.json").write_text(json.dumps(published, indent=2, default=str) + "\n")
    return swap_in(tmp, out)


def swap_in(tmp: Path, out: Path) -> Path:
    """Put the finished folder ``tmp`` in place of ``out``: never half-written (a crash between the two renames
    leaves the old one as ``<out>.old``)."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def load_init(folder: str):
    """(vae, tokenizer, (unet, text_encoder)) of a saved diffusers folder, in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw = dict(torch_dtype=torch.float32, use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw).eval()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return vae, tokenizer, (unet, te)


def portable(arg):
    """A value as published in train_info.json and TRAINING.md: an absolute path of this machine becomes DIR."""
    return "DIR" if isinstance(arg, str) and os.path.isabs(arg) else arg


def command_line(argv: list[str] | None = None) -> str:
    """The training command as typed (``argv`` after ``train``), for train_info.json and TRAINING.md."""
    import shlex
    import sys

    return "python -m sd_demo.shapes train " + shlex.join(portable(a) for a in (sys.argv[2:] if argv is None
                                                                                else argv))


# --- the whole recipe ------------------------------------------------------------------------------------------

def run(cfg: TrainConfig, argv: list[str] | None = None) -> Path:
    from .tokenizer import make_tokenizer

    if not cfg.init and cfg.te_steps == 0 and cfg.te_lr_scale == 0:
        raise ValueError("te_lr_scale: with --te-steps 0 and --te-lr-scale 0 the text encoder would stay random; "
                         "give --te-lr-scale 1 to train it with the UNet")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log(cfg, f"config: {json.dumps({k: v for k, v in asdict(cfg).items() if k != 'start'}, default=str)}")
    scenes, images = make_dataset(cfg.scenes, cfg.seed)
    log(cfg, f"rendered {len(scenes)} train-split scenes")
    init = None
    if cfg.init:
        vae, tokenizer, init = load_init(cfg.init)
        vae.train_steps = 0
        log(cfg, f"continuing from {cfg.init}")
    else:
        tokenizer = make_tokenizer(work / "tokenizer")
        log(cfg, f"tokenizer: {len(tokenizer)} tokens")
        vae = train_vae(cfg, scenes, images)
        if cfg.te_steps > 0:
            init = (make_unet(cfg), pretrain_text_encoder(cfg, scenes, tokenizer)[0])
    vae_error = vae_check(vae, images[-32:], cfg.device)
    log(cfg, f"vae reconstruction error: {vae_error:.2f} / 255 (mean abs)")
    latents = encode_latents(cfg, vae, images, keep_scale=bool(cfg.init))
    del images
    unet, te, info = train_unet(cfg, scenes, latents, tokenizer, vae, out, init=init)
    info.update(config={k: v for k, v in asdict(cfg).items() if k != "start"}, minutes=cfg.minutes(),
                vae_steps=vae.train_steps, vae_error=vae_error, command=command_line(argv))
    final = export(out / "model", vae, te, tokenizer, unet, info, schedule=schedule_config(cfg))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    log(cfg, f"model saved to {final} ({folder_mb(final):.1f} MB) after {cfg.minutes():.1f} min")
    return final


def add_arguments(parser) -> None:
    """CLI flags generated from TrainConfig's fields (``--max-minutes``, ``--unet-steps``, ...)."""
    from dataclasses import fields

    from ..flags import add_field_flags

    add_field_flags(parser, [(f.name, f.default, f.metadata) for f in fields(TrainConfig)
                             if f.name not in ("out", "start")])
    parser.add_argument("--out", type=Path, required=True, help="output folder (the model goes to OUT/model)")


def config_from_args(args) -> TrainConfig:
    from dataclasses import fields

    return TrainConfig(**{f.name: (tuple(v) if isinstance(v, list) else v)
                          for f in fields(TrainConfig) if f.name != "start"
                          for v in [getattr(args, f.name)]})
