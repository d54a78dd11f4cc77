"""The training loop: data -> cached latents / text embeddings -> UNet noise-prediction loss -> adapter weights.

Determinism is by construction so that ``--resume`` continues exactly: every random draw of step k (noise,
timesteps, flips, caption dropout) comes from a generator seeded with (seed, k), the batch order from a sampler
whose position is checkpointed, and the optimizer / LR-schedule states are saved with the weights.
"""
from __future__ import annotations

import contextlib

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..hub import card_license
from ..models import load_model, pick_device
from . import checkpoint as ckpt
from . import estimate, methods, preserve, presets
from .card import write_card
from .config import Method, TrainConfig
from .batches import BucketBatchSampler, TrainDataset, load_example, micro_conditioning, to_tensor
from .data import DataConfig, for_training, read_dataset, trigger_pattern

log = logging.getLogger(__name__)


@dataclass
class TrainEvent:
    """One progress report; the CLI draws a bar from it, the UI a plot and a gallery."""

    step: int
    total: int
    loss: float
    lr: float
    sec_per_step: float
    eta_sec: float
    images: list = field(default_factory=list)  # validation images (PIL) when sampled at this step
    message: str = ""


@dataclass
class TrainResult:
    out: Path
    files: list[Path]
    steps: int
    final_loss: float | None
    losses: list[float]
    warnings: list[str] = field(default_factory=list)
    preset: presets.Resolved | None = None  # the config that ran, its preset and the values that came from it


def prepare_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite or cfg.resume):
        raise ValueError(f"out: '{out}' is not empty; choose a new folder, or pass --overwrite (or --resume latest)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per (seed, step): resuming at step k draws exactly what an uninterrupted run draws at step k.
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


@torch.no_grad()
def cache_latents(vae, dataset: TrainDataset, flips: bool) -> dict[tuple[int, bool], torch.Tensor]:
    """VAE-encode every image once (both orientations when flipping): the VAE never runs in the loop."""
    cache = {}
    sf = vae.config.scaling_factor
    for i, ex in enumerate(dataset.examples):
        h, w = dataset.bucket(i)
        for flip in ((False, True) if flips else (False,)):
            img = load_example(ex, (w, h), center_crop=dataset.cfg.center_crop, flip=flip)
            x = to_tensor(img).unsqueeze(0).to(vae.device, vae.dtype)  # (1, 3, H, W)
            cache[(i, flip)] = (vae.encode(x).latent_dist.mean * sf).squeeze(0).float()  # (4, H/8, W/8)
    return cache


class TextEncoderCache:
    """Text conditioning per caption. Cached when the text encoders are frozen (the common LoRA case), and when only
    new token rows train (--trigger-token, textual inversion) for the captions without those tokens (preservation
    prompts, class prompts): those cannot change, so only captions with a trained token are encoded each step."""

    def __init__(self, pipe, frozen: bool, sdxl: bool, new_tokens: dict[str, int] | None = None):
        self.pipe, self.frozen, self.sdxl, self.cache = pipe, frozen, sdxl, {}
        self.new_tokens = new_tokens  # tokenizer attribute -> first new id, when only new token rows train
        self._constants: dict[str, bool] = {}  # caption -> has no trained token (tokenized once, not every step)

    def _constant(self, caption: str) -> bool:
        if self.frozen:
            return True
        if self.new_tokens is None:
            return False
        if caption not in self._constants:
            self._constants[caption] = all(max(getattr(self.pipe, tok)(caption).input_ids) < first
                                           for tok, first in self.new_tokens.items())
        return self._constants[caption]

    def __call__(self, captions: list[str]) -> dict:
        live = [c for c in dict.fromkeys(captions) if not self._constant(c)]
        if len(live) == len(set(captions)):
            return self._encode(captions)
        for c in set(captions) - set(self.cache) - set(live):
            with torch.no_grad():
                self.cache[c] = {k: v[0] for k, v in self._encode([c]).items()}
        fresh = self._encode(live) if live else {}
        rows = {c: {k: v[i] for k, v in fresh.items()} for i, c in enumerate(live)}
        rows.update({c: self.cache[c] for c in set(captions) - set(live)})
        return {k: torch.stack([rows[c][k] for c in captions]) for k in rows[captions[0]]}

    def _encode(self, captions: list[str]) -> dict:
        if not self.sdxl:
            emb = self.pipe.encode_prompt(captions, self.pipe.device, 1, False)[0]
            return {"encoder_hidden_states": emb}
        emb, _, pooled, _ = self.pipe.encode_prompt(captions, device=self.pipe.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb, "text_embeds": pooled}


def sdxl_added_cond(text: dict, time_ids: list[tuple[int, ...]], dtype) -> dict:
    """SDXL's micro-conditioning, one (original size, crop top-left, target size) row per image."""
    return {"added_cond_kwargs": {"text_embeds": text.pop("text_embeds"),
                                  "time_ids": torch.tensor(time_ids, dtype=dtype)}}


def loss_fn(pred, noise, latents, t, noise_sched, snr_gamma: float, weighting: str = "min-snr") -> torch.Tensor:
    """MSE to ε or v (the model's prediction_type), weighted per sample by SNR (``weighting``, config.SNR_WEIGHTINGS):

    - min-snr (Hang et al. 2023): min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v. On a v-prediction model
      this also fades out the high-noise steps: below 0.22 for t > 500 and 0.06 for t > 700 on the embedded model.
    - cap: min(1, γ / (SNR + 1)) for v (the diffusers examples' first v-prediction form: SNR + 1 in place of SNR),
      which only down-weights low-noise steps; for ε it equals min-snr.
    """
    v = noise_sched.config.prediction_type == "v_prediction"
    target = noise_sched.get_velocity(latents, noise, t) if v else noise
    if not snr_gamma:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_sched, t)
    if weighting == "cap" and v:
        weight = torch.clamp(snr_gamma / (snr + 1), max=1.0)
    else:
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v else snr)
    per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per * weight).mean()


class Batches:
    """Endless, resumable stream of index batches from the bucket sampler (next epoch when one runs out)."""

    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler
        self._it = iter(sampler)

    def __next__(self) -> list[int]:
        try:
            return next(self._it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._it = iter(self.sampler)
            return next(self._it)


def weights_dtype(cfg: TrainConfig, device: str) -> str:
    """The dtype the base model loads in. Mixed precision on a GPU stores the frozen weights (VAE, text encoder, the
    UNet under a LoRA) in that half type, as the diffusers examples do; otherwise everything is fp32. The trained
    parameters themselves are always fp32 (``Trainable.upcast``)."""
    return cfg.mixed_precision if cfg.mixed_precision in ("fp16", "bf16") and device != "cpu" else "fp32"


def make_optimizer(params, cfg: TrainConfig, device: str):
    # No weight decay for textual inversion: it would pull the new embedding towards zero, away from the vocabulary.
    decay = methods.method_spec(cfg).weight_decay
    if device == "cuda":
        try:  # 8-bit AdamW halves optimizer memory on GPUs; optional dependency
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=decay)
        except ImportError:
            log.info("bitsandbytes not installed: using torch AdamW")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=decay)


def lr_schedule_name(cfg: TrainConfig) -> str:
    """diffusers' plain 'constant' ignores warm-up steps: with --warmup-steps it becomes constant_with_warmup."""
    return "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule


def _validation_images(model, cfg: TrainConfig, unet) -> list:
    from ..generate import GenerationParams, generate

    unet.eval()
    try:
        params = GenerationParams(prompt=cfg.validation_prompt, steps=20, seed=cfg.seed, batch_size=2,
                                  width=cfg.resolution, height=cfg.resolution)
        return generate(model, params, preview_every=0).images
    finally:
        unet.train()


@dataclass
class Stream:
    """One source of training batches: the instance images, or DreamBooth's class images (prior preservation)."""

    dataset: TrainDataset
    latents: dict
    sampler: BucketBatchSampler
    weight: float = 1.0

    def __post_init__(self):
        self.batches = Batches(self.sampler)


def make_accelerator(mixed_precision: str, cpu: bool):
    """An Accelerator with this run's precision and device. accelerate keeps one state per process, so a process
    that trains twice (the UI) would get "AcceleratorState has already been initialized ... restart your runtime"
    when the second run asks for another precision or device. A single process starts the state afresh; under
    ``accelerate launch`` the state belongs to the launcher and stays."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not torch.distributed.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)  # private, but the documented way to start over
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def make_stream(cfg: TrainConfig, pipe, report, trigger: str | None, seed: int, weight: float = 1.0,
                path: str | None = None) -> Stream:
    """A stream of ``report``'s images at the run's resolution with ``trigger`` in their captions (for_training)."""
    dcfg = DataConfig(path=path or cfg.data, resolution=cfg.resolution, trigger=trigger, center_crop=cfg.center_crop,
                      buckets=cfg.buckets)
    dataset = TrainDataset(for_training(report, dcfg), dcfg)
    return Stream(dataset, cache_latents(pipe.vae, dataset, cfg.random_flip),
                  BucketBatchSampler(dataset, cfg.batch, seed=seed), weight)


def class_prompts(cfg: TrainConfig, captions: list[str]) -> list[str]:
    """The prompts class images are generated from: --class-prompt, or with --class-word each instance caption
    with the trigger replaced by the class word, so instance and class prompts differ in that word alone and the
    adapter learns what the trigger means rather than what the instance captions' phrasing means. Several
    comma-separated class words take turns (every caption meets every word before any pair repeats), so the
    prior covers a whole family ("circle,square,star") and the adapter cannot turn all of it into the subject."""
    if not cfg.class_word:
        return [cfg.class_prompt]
    trigger = trigger_pattern(cfg.trigger)
    words = [w.strip() for w in cfg.class_word.split(",") if w.strip()]
    n = len(captions)
    return [trigger.sub(words[(i // n + i % n) % len(words)], captions[i % n]) for i in range(n * len(words))]


def make_class_images(cfg: TrainConfig, model, out: Path, captions: list[str]) -> Path:
    """DreamBooth prior preservation: class images from the base model (before any adapter), kept in out/, each
    with its prompt in a sidecar .txt."""
    from ..generate import GenerationParams, generate
    from ..infotext import write_png

    folder = out / "class_images"
    folder.mkdir(exist_ok=True)
    prompts = class_prompts(cfg, captions)
    have = len(list(folder.glob("*.png")))
    for i in range(have, cfg.num_class_images):  # resumable: existing images are kept
        prompt = prompts[i % len(prompts)]
        params = GenerationParams(prompt=prompt, steps=20, seed=cfg.seed + i, width=cfg.resolution,
                                  height=cfg.resolution)
        r = generate(model, params, preview_every=0)
        write_png(r.images[0], folder / f"class-{i:04d}.png", r.infotexts[0])
        (folder / f"class-{i:04d}.txt").write_text(prompt)
    return folder


def load_for_training(cfg: TrainConfig):
    """The instance data (read once), the base model loaded in the run's precision, and the config with its
    preset's values filled in (a LoRA or DreamBooth run without --trigger takes the made-up word its captions
    share: data.find_trigger)."""
    report = read_dataset(DataConfig(path=cfg.data, instance_prompt=cfg.instance_prompt, trigger=cfg.trigger))
    device = pick_device("auto")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    precision = presets.load_precision(cfg, device, bf16)
    model = load_model(cfg.model, device=device, dtype=weights_dtype(replace(cfg, mixed_precision=precision), device))
    found = presets.trigger_in(cfg, [ex.caption for ex in report.examples], model.pipe.tokenizer)
    resolved = presets.resolve(cfg, presets.family_key(model), device, model.default_size,
                               estimate.available_bytes(device), bf16, found)
    resolved.cfg.validate()
    return model, resolved, report


def _trainable_guess(cfg: TrainConfig, pipe) -> int:
    """Parameters that will train, known before the adapter exists: a whole UNet (and text encoders), or for an
    adapter or an embedding a few percent of the UNet at most."""
    if methods.method_spec(cfg).is_model:
        mods = [pipe.unet] + ([pipe.text_encoder] if cfg.train_text_encoder else [])
        return sum(p.numel() for m in mods for p in m.parameters())
    return sum(p.numel() for p in pipe.unet.parameters()) // 50


def _say(on_event, cfg: TrainConfig, step: int, message: str) -> None:
    """A progress event that carries only a message (the preset, the estimates)."""
    log.info("%s", message)
    if on_event:
        on_event(TrainEvent(step, cfg.steps, float("nan"), 0.0, 0.0, 0.0, message=message))


@dataclass
class Run:
    """What a training run holds between its stages: one object instead of a dozen positional arguments."""

    cfg: TrainConfig
    resolved: presets.Resolved  # the config as its preset filled it, and what the preset set
    out: Path
    model: object  # models.LoadedModel
    report: object  # data.DatasetReport of the instance images
    streams: list[Stream]
    trainable: methods.Trainable
    preserver: preserve.Preserver | None
    text: TextEncoderCache
    optimizer: object
    lr_sched: object
    noise_sched: object
    accelerator: object
    unet: torch.nn.Module  # pipe.unet, or accelerate's wrapper of it
    start: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def sdxl(self) -> bool:
        return self.model.family == "sdxl"


def train(cfg: TrainConfig, on_event: Callable[[TrainEvent], None] | None = None,
          cancel: threading.Event | None = None) -> TrainResult:
    """Run a whole training job; ``cancel`` stops it after the current step with a resumable checkpoint."""
    run = prepare(cfg, on_event)
    stopped_at = train_steps(run, on_event, cancel)
    if stopped_at is not None:
        return TrainResult(run.out, [], stopped_at, run.losses[-1], run.losses,
                           ["stopped: resume with --resume latest"], run.resolved)
    run.accelerator.wait_for_everyone()
    files = _finish(run) if run.accelerator.is_main_process else []
    return TrainResult(run.out, files, run.cfg.steps, run.losses[-1] if run.losses else None, run.losses,
                       report_warnings(run.report), run.resolved)


def prepare(cfg: TrainConfig, on_event=None) -> Run:
    """1. Check inputs, 2. load the model and fill in the preset, 3. cache the data, 4. set up what trains."""
    cfg.validate()
    if cfg.push_to_hub:  # offline or without a token the push would fail only after the whole run
        from ..hub import check_push

        check_push(cfg.push_to_hub)
    out = prepare_out(cfg)
    torch.manual_seed(cfg.seed)
    model, resolved, report = load_for_training(cfg)
    cfg, pipe = resolved.cfg, model.pipe
    _say(on_event, cfg, 0, resolved.summary())
    _say(on_event, cfg, 0, estimate.check_fits(cfg, presets.family_key(model), pipe, _trainable_guess(cfg, pipe),
                                               model.device))
    accelerator = make_accelerator(cfg.mixed_precision, cpu=model.device == "cpu")
    if not cfg.resume and accelerator.is_main_process:
        ckpt.set_aside_earlier_run(out / "checkpoints")
    accelerator.wait_for_everyone()
    streams = _data_streams(cfg, model, out, accelerator, report)
    if cfg.validation_prompt is None and cfg.validation_every:  # live samples of the first caption, fixed seeds
        cfg = replace(cfg, validation_prompt=streams[0].dataset.examples[0].caption)
    trainable = methods.setup(cfg, pipe)
    preserver = preserve.build(cfg, model, trainable, [ex.caption for ex in streams[0].dataset.examples])
    trainable.upcast()
    optimizer, lr_sched, noise_sched = _optimisation(cfg, model, trainable)
    text = TextEncoderCache(pipe, frozen=not trainable.trains_text_encoder, sdxl=model.family == "sdxl",
                            new_tokens=trainable.new_token_ids())
    run = Run(cfg=cfg, resolved=resolved, out=out, model=model, report=report, streams=streams, trainable=trainable,
              preserver=preserver, text=text, optimizer=optimizer, lr_sched=lr_sched, noise_sched=noise_sched,
              accelerator=accelerator, unet=pipe.unet)
    run.start, run.losses = _restore(run)
    _prepare_unet(run)
    return run


def _data_streams(cfg: TrainConfig, model, out: Path, accelerator, report) -> list[Stream]:
    """The instance images, and for DreamBooth with prior preservation the class images (generated if missing)."""
    instance = make_stream(cfg, model.pipe, report, cfg.trigger, cfg.seed)
    streams = [instance]
    if cfg.method == Method.DREAMBOOTH.value and (cfg.num_class_images or cfg.class_data):
        if cfg.num_class_images and accelerator.is_main_process:  # one process generates, the others wait
            make_class_images(cfg, model, out, [ex.caption for ex in instance.dataset.examples])
        accelerator.wait_for_everyone()
        class_dir = cfg.class_data or str(out / "class_images")
        try:
            class_report = read_dataset(DataConfig(path=class_dir, instance_prompt=cfg.class_prompt,
                                                   prompt_name="--class-prompt"))
            streams.append(make_stream(cfg, model.pipe, class_report, None, cfg.seed + 1, cfg.prior_loss_weight,
                                       path=class_dir))
        except ValueError as exc:  # say which of the two folders the data error is about
            raise ValueError(f"class images: {exc}") from None
    return streams


def _optimisation(cfg: TrainConfig, model, trainable) -> tuple:
    """(optimizer, LR schedule, noise schedule) for what trains."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(trainable.param_groups(cfg.lr, cfg.text_encoder_lr, cfg.token_lr), cfg, model.device)
    lr_sched = get_scheduler(lr_schedule_name(cfg), optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=cfg.steps)
    return optimizer, lr_sched, DDPMScheduler.from_config(model.base_scheduler_config)


def _prepare_unet(run: Run) -> None:
    """Checkpointing, accelerate's wrapper (DDP under a launcher) and compilation, in that order."""
    pipe, cfg, acc = run.model.pipe, run.cfg, run.accelerator
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    # The LR schedule stays outside accelerate, which would step it once per process per step: --steps counts
    # optimizer steps whatever the number of processes.
    if any(p.requires_grad for p in pipe.unet.parameters()):  # DDP refuses a module with nothing to train
        run.unet, run.optimizer = acc.prepare(pipe.unet, run.optimizer)
    else:  # textual inversion: only text-encoder rows train
        run.optimizer = acc.prepare(run.optimizer)
    if cfg.compile:  # here, not through Accelerator(dynamo_backend=...), which a launcher's state overrides
        run.unet = torch.compile(run.unet)
    run.unet.train()


def train_steps(run: Run, on_event=None, cancel: threading.Event | None = None) -> int | None:
    """The loop: step, report, sample, checkpoint. Returns the step a Stop arrived at, or None when it ran out."""
    cfg, main = run.cfg, run.accelerator.is_main_process  # under multi-GPU one process samples and reports
    t0 = time.perf_counter()
    for step in range(run.start, cfg.steps):
        loss = _train_step(run, step)
        _mean_text_encoder_grads(run.trainable, run.accelerator)
        run.optimizer.step()
        run.lr_sched.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.losses.append(loss)
        done = step + 1
        if on_event and main:
            _report(run, on_event, done, (time.perf_counter() - t0) / (done - run.start))
        stopping = cancel is not None and cancel.is_set() and done < cfg.steps
        # with checkpoints on, the last step gets one too: "train N more steps" resumes from it
        periodic = cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
        if (periodic or stopping) and main:
            ckpt.save_checkpoint(run.out / "checkpoints", done, run.trainable.state(), run.optimizer, run.lr_sched,
                                 {"samplers": [s.sampler.state_dict() for s in run.streams], "losses": run.losses},
                                 cfg.keep_checkpoints)
        if stopping:
            return done
    return None


def _report(run: Run, on_event, done: int, rate: float) -> None:
    """The step's event, with validation samples when due, and the time estimate after the warm-up steps."""
    cfg = run.cfg
    due = cfg.validation_prompt and cfg.validation_every and done % cfg.validation_every == 0 and done < cfg.steps
    images = _validation_images(run.model, cfg, run.unet) if due else []  # through pipe.unet, not the DDP wrapper
    on_event(TrainEvent(done, cfg.steps, run.losses[-1], run.lr_sched.get_last_lr()[0], rate,
                        rate * (cfg.steps - done), images))
    if done - run.start == estimate.WARMUP_STEPS and done < cfg.steps:
        _say(on_event, cfg, done, estimate.time_line(rate, cfg.steps - done, cfg.steps, run.model.device))


def _mean_text_encoder_grads(trainable, accelerator) -> None:
    """Under multi-process training DDP averages the UNet's gradients; text-encoder parts that train (textual
    inversion rows, text-encoder LoRA, full text encoder) are not in DDP's module, so average them here, or each
    process would drift to its own weights."""
    if accelerator.num_processes == 1:
        return
    for name, mod in trainable.modules.items():
        if name == "unet":
            continue
        for p in mod.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad = accelerator.reduce(p.grad, reduction="mean")


def _restore(run: Run) -> tuple[int, list[float]]:
    """Load --resume state into everything that carries state; (0, []) for a fresh run."""
    if not run.cfg.resume:
        return 0, []
    weights, opt_state, meta = ckpt.load_resume(run.cfg.resume, run.out)
    run.trainable.load_state(weights)
    run.optimizer.load_state_dict(opt_state)
    run.lr_sched.load_state_dict(meta["lr_scheduler"])
    samplers = meta.get("samplers")
    if not isinstance(samplers, list):
        raise ValueError("resume: the checkpoint holds no data position (state.json has no 'samplers'); start again "
                         "without --resume")
    if len(samplers) != len(run.streams):
        raise ValueError("resume: the checkpoint was made with other data streams (prior preservation on/off)")
    for stream, state in zip(run.streams, samplers):
        stream.sampler.load_state_dict(state)
    return meta["step"], meta.get("losses", [])


def _finish(run: Run) -> list[Path]:
    """Export weights, sample the validation prompt, write the model card."""
    cfg, model, out = run.cfg, run.model, run.out
    files = methods.method_spec(cfg).export(run.trainable, model.pipe, out, cfg)
    samples = []
    if cfg.validation_prompt:
        (out / "samples").mkdir(exist_ok=True)
        for i, img in enumerate(_validation_images(model, cfg, run.unet)):
            samples.append(out / "samples" / f"sample-{i}.png")
            img.save(samples[-1])
    license = card_license(model.folder) or "other"  # a fine-tune carries its base model's license
    files.append(write_card(out, cfg, model.ref, samples, run.losses[-1] if run.losses else None, license,
                            preset=run.resolved))
    if cfg.push_to_hub:  # what this run wrote: not its checkpoints or class images, nor a user's files in --out
        from ..hub import push_folder

        push_folder(cfg.push_to_hub, out, files + samples, private=not cfg.public)
    return files


WARNED_FILES = 20  # files named one per line at the end of a run; thousands would bury the log


def report_warnings(report) -> list[str]:
    def listed(lines: list[str], what: str) -> list[str]:
        more = len(lines) - WARNED_FILES
        return lines[:WARNED_FILES] + ([f"... and {more} more {what}"] if more > 0 else [])

    return (listed([f"skipped {name}: {why}" for name, why in report.skipped], "skipped files")
            + listed([f"upscaled {name} (smaller than the resolution)" for name in report.upscaled],
                     "upscaled images"))


def _stream_loss(run: Run, g: torch.Generator, stream: Stream, preserver: preserve.Preserver | None = None
                 ) -> torch.Tensor:
    """Noise-prediction loss on one batch of one stream; all randomness from the step generator ``g``.

    Under ``accelerate launch`` every process walks the same batch sequence and takes its own share (process r of
    P trains the r-th of each P consecutive batches), so the data position stays identical across processes.
    """
    cfg, acc, noise_sched = run.cfg, run.accelerator, run.noise_sched
    shares = [next(stream.batches) for _ in range(acc.num_processes)]
    idx = shares[acc.process_index]
    flips = [bool(torch.rand(1, generator=g) < 0.5) if cfg.random_flip else False for _ in idx]
    lat = torch.stack([stream.latents[(i, f)] for i, f in zip(idx, flips)]).to(acc.device)  # (B, 4, h, w)
    captions = [("" if cfg.caption_dropout and torch.rand(1, generator=g).item() < cfg.caption_dropout
                 else stream.dataset.examples[i].caption) for i in idx]
    noise = torch.randn(lat.shape, generator=g).to(lat)
    if cfg.noise_offset:  # shifts each channel's mean: lets the model learn very dark / bright images
        noise = noise + cfg.noise_offset * torch.randn(lat.shape[:2] + (1, 1), generator=g).to(lat)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (lat.shape[0],), generator=g).to(lat.device)
    noisy = noise_sched.add_noise(lat, noise, t)
    cond = run.text(captions)
    if run.sdxl:
        h, w = stream.dataset.bucket(idx[0])
        cond.update(sdxl_added_cond(cond, [micro_conditioning(stream.dataset.examples[i], (w, h), flip=f,
                                                              center_crop=cfg.center_crop)
                                           for i, f in zip(idx, flips)], lat.dtype))
    b = noisy.shape[0]
    if preserver is not None:  # other prompts keep the base model's answers; their adapter pass joins this batch's
        px, pt, pcond = preserver.inputs(g, noisy, t, cond, run.text, noise, noise_sched, captions)
        base = preserver.base(px, pt, pcond, acc)
        noisy, t, cond = torch.cat([noisy, px]), torch.cat([t, pt]), preserve.joined(cond, pcond)
    with acc.autocast():
        pred = run.unet(noisy, t, **cond).sample
    loss = loss_fn(pred[:b], noise, lat, t[:b], noise_sched, cfg.snr_gamma, cfg.snr_weighting)
    if preserver is not None:
        loss = loss + preserver.loss(pred[b:], base)
    return loss


def _train_step(run: Run, step: int) -> float:
    """One optimizer step's forward/backward passes (grad_accum micro-batches); returns the mean loss.

    Each micro-batch draws its randomness from a generator seeded by its global batch number, the same number that
    picks its data (micro-batch k of process r trains batch (step * grad_accum + k) * P + r of P processes). So
    P processes with grad_accum A train exactly what one process with grad_accum P * A trains: DDP's gradient mean
    equals the accumulated sum of loss / (P * A), up to float rounding."""
    cfg, acc = run.cfg, run.accelerator
    total = 0.0
    for k in range(cfg.grad_accum):
        g = step_generator(cfg.seed, (step * cfg.grad_accum + k) * acc.num_processes + acc.process_index)
        # output preservation rides on the instance stream (the first) only
        loss = sum(s.weight * _stream_loss(run, g, s, run.preserver if i == 0 else None)
                   for i, s in enumerate(run.streams))
        loss = loss / cfg.grad_accum
        if loss.requires_grad:  # textual inversion: a batch whose captions all dropped the token has no gradient
            # DDP all-reduces gradients only on the last micro-batch; the earlier ones accumulate locally.
            with acc.no_sync(run.unet) if k < cfg.grad_accum - 1 else contextlib.nullcontext():
                acc.backward(loss)
        total += loss.item()
    return total
