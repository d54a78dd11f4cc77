"""TrainConfig: every training option with its default and why; CLI flags are generated from it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import Enum


class Method(str, Enum):
    LORA = "lora"
    DREAMBOOTH = "dreambooth"
    TEXTUAL_INVERSION = "textual-inversion"
    FULL = "full"


LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
# How --snr-gamma weights a step (loop.loss_fn): "min-snr" is Hang et al.'s formula; "cap" only down-weights the
# low-noise steps (on a v-prediction model min-snr also fades out the high-noise ones, where a new shape is decided).
SNR_WEIGHTINGS = ("min-snr", "cap")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    method: str = _f("lora", "lora | dreambooth | textual-inversion | full", choices=[m.value for m in Method])
    model: str = _f("embedded", "base model: Hub id[@rev], local diffusers folder, or embedded")
    data: str = _f("", "folder (or .zip) of images with .txt captions or metadata.jsonl")
    out: str = _f("", "output folder; refused when it exists and is not empty, unless --overwrite or --resume")
    # Fields defaulting to None come from the preset (train/presets.py) for the model family, device and method.
    preset: str | None = _f(None, "preset name (e.g. sd1-lora-gpu16); default: the one for this model, device and "
                                  "method. Options you give always win over it")
    steps: int | None = _f(None, "optimizer steps", type=int)
    lr: float | None = _f(None, "learning rate (LoRA 1e-4, full 5e-6, textual inversion 5e-3 are usual)", type=float)
    rank: int | None = _f(None, "LoRA rank r", type=int)
    alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha / rank", type=float)
    resolution: int | None = _f(None, "training side in px (default: the base model's native size)", type=int)
    batch: int | None = _f(None, "images per step", type=int)
    grad_accum: int = _f(1, "micro-batches per optimizer step", flag="--grad-accum")
    seed: int = _f(0, "seed of everything random: data order, noise, timesteps, dropout")
    trigger: str | None = _f(None, "trigger word, prepended to captions that lack it (LoRA/DreamBooth; default: a "
                                   "word of every caption that the model does not know, e.g. 'zkring')")
    instance_prompt: str | None = _f(None, "one caption for every image that has none")
    checkpoint_every: int | None = _f(None, "save a resumable checkpoint every N steps and at the end (0 = none; "
                                            "default: a tenth of the steps for adapters and embeddings)", type=int)
    keep_checkpoints: int = _f(2, "checkpoints kept; older ones are deleted after a new one is complete")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to continue from")
    lr_schedule: str = _f("constant", "LR schedule", choices=list(LR_SCHEDULES))
    warmup_steps: int = _f(0, "linear warm-up steps (any schedule; 'constant' then ramps up first)")
    snr_gamma: float | None = _f(None, "min-SNR-γ loss weighting (5.0 is usual; 0 = off)", type=float)
    snr_weighting: str | None = _f(None, "min-snr: weight min(SNR, γ)/SNR (ε) or /(SNR+1) (v); cap: min(1, "
                                         "γ/(SNR+1)) for v, which keeps the high-noise steps that min-snr fades out "
                                         "(the same as min-snr for ε)", choices=list(SNR_WEIGHTINGS))
    noise_offset: float = _f(0.0, "noise offset (0.05-0.1 helps very dark/bright images; 0 = off)")
    mixed_precision: str | None = _f(None, "no | fp16 | bf16 (GPU only)", choices=list(PRECISIONS))
    gradient_checkpointing: bool | None = _f(None, "trade compute for memory", type=bool)
    compile: bool = _f(False, "torch.compile the UNet (inductor, like kohya's --torch_compile): the first step "
                              "compiles for a minute or more; meant for GPUs and big models (on a 2-core CPU it was "
                              "no faster, see BENCHMARKS.md)")
    train_text_encoder: bool = _f(False, "also train the text encoder (LoRA on it, or fully for 'full')")
    text_encoder_lr: float | None = _f(None, "learning rate of the text encoder(s) when they train beside the UNet "
                                             "(--train-text-encoder); default: --lr", type=float)
    token_lr: float | None = _f(None, "learning rate of the trigger's new token rows (--trigger-token); default: "
                                      "--text-encoder-lr, else --lr", type=float)
    target_modules: str | None = _f(None, "comma-separated UNet modules that get LoRA (e.g. to_q,to_k,to_v,to_out.0)")
    center_crop: bool = _f(True, "centre crop (else a random crop, drawn once per image: latents are cached)")
    random_flip: bool = _f(False, "random horizontal flip")
    caption_dropout: float = _f(0.0, "probability of training on an empty caption (helps CFG)")
    buckets: bool = _f(False, "aspect-ratio buckets instead of square crops")
    validation_prompt: str | None = _f(None, "prompt sampled every --validation-every steps (default: the first "
                                              "caption of the data)")
    validation_every: int | None = _f(None, "steps between validation samples (0 = only at the end)", type=int)
    init_word: str = _f("object", "textual inversion: the word the new token starts from")
    num_vectors: int = _f(1, "textual inversion / --trigger-token: vectors behind the token (A1111's 'vectors "
                             "per token'); more hold more of a concept, e.g. a colour and a shape")
    trigger_token: bool | None = _f(None, "LoRA/DreamBooth: make --trigger a new token and train its embedding "
                                          "with the LoRA (pivotal tuning): the adapter then keys on a token no other "
                                          "prompt has", type=bool)
    class_prompt: str | None = _f(None, "DreamBooth prior preservation: prompt of the class ('a photo of a dog')")
    class_word: str | None = _f(None, "DreamBooth prior preservation: class prompts are the instance captions with "
                                      "the trigger replaced by this word ('circle'), instead of one --class-prompt; "
                                      "several comma-separated words take turns ('circle,square,star')")
    num_class_images: int | None = _f(None, "DreamBooth: class images generated by the base model when missing "
                                            "(needs --class-prompt or --class-word); 0 = off", type=int)
    class_data: str | None = _f(None, "DreamBooth prior preservation with your own class images: a folder (or "
                                      ".zip) captioned like --data, else by --class-prompt; instead of generated ones")
    prior_loss_weight: float = _f(1.0, "DreamBooth: weight of the prior-preservation loss")
    dreambooth_full: bool = _f(False, "DreamBooth: fine-tune the whole UNet instead of a LoRA")
    overwrite: bool = _f(False, "write into a non-empty --out (never deletes files we did not write)")
    push_to_hub: str | None = _f(None, "Hub repo id to push the result to (created private)")
    public: bool = _f(False, "--push-to-hub: create the repo public instead of private")
    preserve: float | None = _f(None, "LoRA output preservation: weight of a loss keeping the adapter's answers to "
                                      "other prompts equal to the base model's, so only the trigger changes (0 = off)",
                                type=float)
    preserve_prompts: str | None = _f(None, "--preserve: a .txt of other prompts, one a line (default: the embedded "
                                            "model's own world; else the captions, --trigger replaced by --class-word)")
    preserve_batch: int | None = _f(None, "--preserve: preservation prompts per micro-batch, on its first N noisy "
                                          "latents (0 = one per image)", type=int)
    preserve_swap: int | None = _f(None, "--preserve: rows per micro-batch that ask the instance images' own noisy "
                                         "latents for their caption with the trigger swapped for another word "
                                         "(--class-word's, else the embedded model's shapes), kept at the base "
                                         "model's answer: the concept's look stays off ordinary words", type=int)
    preserve_swap_weight: float | None = _f(None, "--preserve-swap: weight of those rows against the other "
                                                  "preservation rows (1 = the same)", type=float)

    def validate(self) -> "TrainConfig":
        def bad(name, why):
            raise ValueError(f"{name}: {why}")

        self._check_values(bad)
        if self.method not in {m.value for m in Method}:
            bad("method", f"unknown {_shown(self.method)}; use one of {', '.join(m.value for m in Method)}")
        if not self.data:
            bad("data", "missing; give a folder or .zip of training images")
        if not self.out:
            bad("out", "missing; give an output folder")
        # None = from the preset; validate() runs again once the preset has filled them
        for name in ("steps", "rank", "batch", "grad_accum", "resolution", "num_vectors"):
            if getattr(self, name) is not None and int(getattr(self, name)) <= 0:
                bad(name, f"{getattr(self, name)} must be > 0")
        if self.lr is not None and self.lr <= 0:
            bad("lr", f"{self.lr} must be > 0")
        for name in ("text_encoder_lr", "token_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                bad(name, f"{getattr(self, name)} must be > 0")
        if self.alpha is not None and self.alpha <= 0:
            bad("alpha", f"{self.alpha} must be > 0")
        if self.resolution and self.resolution % 8:
            bad("resolution", f"{self.resolution} px is not a multiple of 8")
        if not 0 <= self.caption_dropout < 1:
            bad("caption_dropout", f"{self.caption_dropout} must be in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"unknown {_shown(self.lr_schedule)}; use one of {', '.join(LR_SCHEDULES)}")
        if self.snr_weighting is not None and self.snr_weighting not in SNR_WEIGHTINGS:
            bad("snr_weighting", f"unknown {_shown(self.snr_weighting)}; use one of {', '.join(SNR_WEIGHTINGS)}")
        if self.mixed_precision is not None and self.mixed_precision not in PRECISIONS:
            bad("mixed_precision", f"unknown {_shown(self.mixed_precision)}; use one of {', '.join(PRECISIONS)}")
        if self.method == Method.DREAMBOOTH.value and not (self.trigger or self.instance_prompt):
            bad("trigger", "DreamBooth needs --trigger (a rare word bound to your subject) or --instance-prompt")
        if self.num_class_images and not (self.class_prompt or self.class_word):
            bad("class_prompt", "prior preservation (--num-class-images) needs --class-prompt, e.g. 'a photo of a dog'"
                " (or --class-word)")
        if self.class_data and self.num_class_images:
            bad("class_data", "give your own class images or --num-class-images to generate them, not both")
        if self.class_data and self.method != Method.DREAMBOOTH.value:
            bad("class_data", "class images are for --method dreambooth (prior preservation)")
        if self.class_word and not self.trigger:
            bad("class_word", "needs --trigger: the word in your captions that --class-word replaces")
        if self.method == Method.TEXTUAL_INVERSION.value and not self.trigger:
            bad("trigger", "textual inversion needs --trigger: the new token to learn (e.g. '<my-cat>')")
        if self.trigger_token:
            if self.method not in (Method.LORA.value, Method.DREAMBOOTH.value) or self.dreambooth_full:
                bad("trigger_token", "is for --method lora or dreambooth (LoRA); textual inversion always makes one")
            if not self.trigger:
                bad("trigger_token", "needs --trigger: the word that becomes the new token")
            if self.train_text_encoder:
                bad("trigger_token", "trains the trigger's embedding instead of the text encoder; drop one of "
                                     "--trigger-token and --train-text-encoder")
        token = self.trigger_token or (self.trigger_token is None and self.method in (Method.LORA.value,
                                                                                     Method.DREAMBOOTH.value))
        if self.num_vectors > 1 and not (self.method == Method.TEXTUAL_INVERSION.value or token):
            # None: the preset decides (checked again once it has)
            bad("num_vectors", "is for --method textual-inversion or --trigger-token")
        if self.preserve is not None and self.preserve < 0:  # None: from a preset
            bad("preserve", f"{self.preserve} must be >= 0")
        if self.preserve and (self.method not in (Method.LORA.value, Method.DREAMBOOTH.value) or self.dreambooth_full):
            bad("preserve", "is for --method lora or dreambooth (LoRA): the base model is the UNet with the adapter "
                            "switched off, which textual inversion and full fine-tunes do not have")
        if self.preserve_prompts and self.preserve is not None and self.preserve == 0:
            bad("preserve_prompts", "needs --preserve > 0 (the weight of output preservation)")
        if self.preserve_batch is not None and (self.preserve_batch < 0 or (self.batch is not None
                                                                          and self.preserve_batch > self.batch)):
            bad("preserve_batch", f"{self.preserve_batch} must be between 0 and --batch")
        if self.preserve_swap is not None and (self.preserve_swap < 0 or (self.batch is not None
                                                                        and self.preserve_swap > self.batch)):
            bad("preserve_swap", f"{self.preserve_swap} must be between 0 and --batch")
        if self.preserve_swap_weight is not None and not 0 <= self.preserve_swap_weight <= 100:
            bad("preserve_swap_weight", f"{self.preserve_swap_weight:g} is out of range; use 0 to 100")
        if self.preserve_swap and self.preserve is not None and self.preserve == 0:
            bad("preserve_swap", "needs --preserve > 0 (the weight of output preservation)")
        if self.preserve_swap and not self.class_word and self.model != "embedded":
            bad("preserve_swap", "on this model give --class-word (the words put in the trigger's place)")
        return self

    def _check_values(self, bad) -> None:
        """Numbers a run can use and text the tokenizer can read; each of these failed mid-run, or trained garbage,
        once the model was loaded."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):  # nan passed every '<= 0' check below
                bad(f.name, f"{v} is not a finite number")
            if f.name in _TOKENIZED and isinstance(v, str):  # a lone surrogate (non-UTF-8 argv bytes, JSON)
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as exc:
                    bad(f.name, f"character {exc.start + 1} is not valid Unicode text; remove it")
        for name in _NON_NEGATIVE:  # a negative snr_gamma or prior_loss_weight turns the loss around
            if getattr(self, name) is not None and getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if not 0 <= self.seed <= MAX_SEED:  # numpy's and the validation sample's range; torch overflowed past 64 bits
            bad("seed", f"{self.seed} is out of range; use 0 to {MAX_SEED}")


MAX_SEED = 2**32 - 1  # as generate.MAX_SEED (not imported: this module stays free of torch)
# Text fields that reach the tokenizer (paths may hold non-UTF-8 bytes: those are valid file names).
_TOKENIZED = ("trigger", "instance_prompt", "validation_prompt", "class_prompt", "class_word", "init_word",
              "target_modules")
_NON_NEGATIVE = ("warmup_steps", "checkpoint_every", "validation_every", "num_class_images", "keep_checkpoints",
                 "snr_gamma", "noise_offset", "prior_loss_weight")


def from_values(values: dict) -> TrainConfig:
    """A TrainConfig from form values (the Training tab): blank or None leaves a field at its default (for preset
    fields: the preset's), text is converted to the field's type; a value that does not convert is one line."""
    kw = {}
    for f in fields(TrainConfig):
        v = values.get(f.name)
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        kw[f.name] = _convert(f.name, f.metadata.get("type") or (type(f.default) if f.default is not None else str), v)
    return TrainConfig(**kw)


_TRUE, _FALSE = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def _shown(v) -> str:
    """A value as a message quotes it: on one line (repr escapes a newline) and short."""
    text = str(v)
    return repr(text) if len(text) <= 60 else repr(text[:60]) + "…"


def _convert(name: str, typ: type, v):
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:  # no field goes this far
        raise ValueError(f"{name}: a {v.bit_length()}-bit number is out of range")
    shown = _shown(v)
    if typ is bool:
        if isinstance(v, bool) or str(v).strip().lower() in _TRUE + _FALSE:
            return v if isinstance(v, bool) else str(v).strip().lower() in _TRUE
        raise ValueError(f"{name}: {shown} is not true or false")  # 'ture' was silently False
    if typ not in (int, float):
        return typ(v)
    # An int stays exact (float() of a huge one raised OverflowError and rounded 20-digit seeds); a bool is no
    # number; nan / inf are refused (an lr of nan passed validate and trained garbage).
    if isinstance(v, bool):
        raise ValueError(f"{name}: {shown} is not a number")
    if isinstance(v, int) or (typ is int and isinstance(v, str) and v.strip().lstrip("+-").isdigit()):
        try:
            return typ(int(v))
        except (ValueError, OverflowError):  # text over Python's 4300 digits / a float's range
            raise ValueError(f"{name}: {shown} is too large") from None
    try:
        number = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {shown} is not a valid {typ.__name__}") from None
    if not math.isfinite(number) or (typ is int and not number.is_integer()):
        raise ValueError(f"{name}: {shown} is not a {'whole' if typ is int else 'finite'} number")
    return typ(number)


def config_fields():
    return [(f.name, f.default, f.metadata) for f in fields(TrainConfig)]
