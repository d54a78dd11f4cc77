"""Training presets: every option a user leaves unset takes its value from the preset for the model family, the
device and the method; an explicit flag or field always wins.

A preset is named ``<family>-<method>-<device>``: family ``embedded`` (the shapes model in assets/), ``sd1``,
``sd2`` or ``sdxl``; device ``cpu`` or a GPU tier by memory (``gpu8`` under 14 GiB, ``gpu16`` under 30 GiB,
``gpu40`` above). Values are the ones kohya_ss, ai-toolkit and the diffusers examples ship for these models
(rank 16, lr 1e-4 for LoRA; A1111's 5e-3 for textual inversion; 5e-6 for a full UNet), except on the embedded model,
whose values were measured on it (``tests/test_train_embedded.py``, ``benchmarks/train_defaults.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .config import Method, TrainConfig

FAMILIES = ("embedded", "sd1", "sd2", "sdxl")
DEVICE_TIERS = ("cpu", "gpu8", "gpu16", "gpu40")
GIB = 2**30

# The embedded model's LoRA leaves cross-attention keys, values and output alone: they carry every word of every
# prompt into the image, and a LoRA on them bent the colour words (ordinary colour 94 -> 56-69 %, see
# tests/test_train_embedded.py). The query, self-attention and the ResNet convolutions learn the new shape.
EMBEDDED_TARGETS = "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,conv1,conv2"
SD_TARGETS = "to_q,to_k,to_v,to_out.0"  # the diffusers examples' and kohya's attention LoRA

# What a preset may set: the TrainConfig fields whose default is None ("from the preset").
PRESET_FIELDS = ("resolution", "steps", "lr", "rank", "alpha", "batch", "target_modules", "snr_gamma",
                 "snr_weighting", "mixed_precision", "gradient_checkpointing", "validation_every", "num_class_images",
                 "checkpoint_every", "preserve", "preserve_batch", "preserve_swap", "preserve_swap_weight", "trigger_token",
                 "token_lr")
# Given per run, not in steps, so that they follow --steps: checkpoints of an adapter or an embedding (small files;
# a kill loses a tenth at most) and live sample grids.
PER_RUN = {"checkpoint_every": 10, "validation_every": 5}


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict = field(default_factory=dict)  # TrainConfig field -> value; "resolution" None = the native size
    note: str = ""


def _method_values(family: str, method: Method) -> dict:
    """Family x method values, before the device adjusts batch, precision and memory savers."""
    if family == "embedded":
        lora = dict(rank=32, alpha=32.0, lr=1e-3, target_modules=EMBEDDED_TARGETS, steps=600, batch=8,
                    snr_gamma=5.0)
        return {
            # A plain LoRA has no class images to tell the new concept from what the model knows: output
            # preservation on the model's own world keeps ordinary prompts, and the trigger (given or found in the
            # captions) becomes a new token trained beside the LoRA, which the cross-attention keys learn to
            # answer. The "cap" weighting keeps the high-noise steps where a shape is decided (min-SNR fades them
            # out: 12/16 on two of five data sets); its leak into ordinary shapes is held back by two swap rows a
            # batch (the instance latents asked with the trigger swapped for a known shape, pulled to the base
            # model's answer) weighted 8x. benchmarks/train_defaults.py, session 17: 14-16/16 trigger prompts on
            # all five bar and ring data sets, ordinary prompts >= 90 % of base on four (the fifth: shape 72 %
            # against the 72.9 % needed, one prompt of 64), 213-250 s (BENCHMARKS.md). A new colour (pink) is
            # beyond the embedded VAE's palette: no adapter can learn it.
            Method.LORA: {**lora, "target_modules": EMBEDDED_TARGETS + ",attn2.to_k", "batch": 4, "steps": 550,
                          "snr_weighting": "cap", "preserve": 1.0, "preserve_batch": 4, "preserve_swap": 2,
                          "preserve_swap_weight": 8.0, "trigger_token": True, "token_lr": 5e-3},
            Method.DREAMBOOTH: {**lora, "num_class_images": 24},
            # 300 steps at 5e-2 learnt a two-word compound in 2 vectors (tests/test_train_embedded.py)
            Method.TEXTUAL_INVERSION: dict(lr=5e-2, steps=300, batch=4, snr_gamma=5.0),
            Method.FULL: dict(lr=1e-4, steps=300, batch=8, snr_gamma=5.0, num_class_images=24),
        }[method]
    lora = dict(rank=16, alpha=16.0, lr=1e-4, target_modules=SD_TARGETS, steps=1500, batch=1, snr_gamma=5.0)
    return {
        Method.LORA: lora,
        # DreamBooth paper / diffusers example: ~100 class images, fewer steps than a plain LoRA on a subject
        Method.DREAMBOOTH: {**lora, "steps": 800, "num_class_images": 100},
        Method.TEXTUAL_INVERSION: dict(lr=5e-3, steps=1500, batch=1, snr_gamma=5.0),  # A1111's defaults
        Method.FULL: dict(lr=5e-6, steps=1000, batch=1, snr_gamma=5.0, num_class_images=100),  # and --dreambooth-full
    }[method]


def _device_values(family: str, method: Method, tier: str, values: dict) -> dict:
    """Batch, precision, checkpointing and live samples for the device tier."""
    v = dict(values)
    whole_unet = method == Method.FULL
    if tier == "cpu":
        v["mixed_precision"] = "no"  # CPU autocast to half is slower than fp32 and loses precision
        v["gradient_checkpointing"] = False
        if family != "embedded":
            v["steps"] = min(v["steps"], 500)  # a full-size UNet step takes 10+ s on a CPU: keep runs to hours
            v["validation_every"] = 0  # a sample costs minutes on a CPU: none mid-run
    else:
        v["mixed_precision"] = "bf16"  # resolved to fp16 on GPUs without bf16 (resolve())
        big = family == "sdxl" or whole_unet
        v["gradient_checkpointing"] = tier == "gpu8" or (big and tier == "gpu16")
        if family != "embedded" and method != Method.FULL:
            v["batch"] = {"gpu8": 1, "gpu16": 2, "gpu40": 4}[tier] // (2 if family == "sdxl" else 1) or 1
    v.setdefault("validation_every", PER_RUN["validation_every"])
    v.setdefault("snr_weighting", "min-snr")
    v.setdefault("num_class_images", 0)
    v.setdefault("preserve", 0.0)
    v.setdefault("preserve_batch", 0)
    v.setdefault("preserve_swap", 0)
    v.setdefault("preserve_swap_weight", 1.0)
    if method in (Method.LORA, Method.DREAMBOOTH):
        v.setdefault("trigger_token", False)
    # A whole UNet's checkpoint with its optimizer state is gigabytes (SD 1.5: ~10 GB); only the embedded one is small
    v["checkpoint_every"] = 0 if whole_unet and family != "embedded" else PER_RUN["checkpoint_every"]
    v["resolution"] = None  # the model's native size
    return v


def make_preset(family: str, method: str, tier: str) -> Preset:
    m = Method(method)
    values = _device_values(family, m, tier, _method_values(family, m))
    return Preset(f"{family}-{m.value}-{tier}", values)


PRESETS: dict[str, Preset] = {p.name: p for p in (make_preset(f, m.value, d) for f in FAMILIES for m in Method
                                                  for d in DEVICE_TIERS)}


def device_tier(device: str, memory_bytes: int | None) -> str:
    if device == "cpu":
        return "cpu"
    gib = (memory_bytes or 0) / GIB
    return "gpu8" if gib < 14 else "gpu16" if gib < 30 else "gpu40"


def family_key(model) -> str:
    """'embedded' for the shipped shapes model, else the loaded model's family (sd1 / sd2 / sdxl)."""
    return "embedded" if model.ref.source == "embedded" else model.family


def pick(cfg: TrainConfig, family: str, tier: str) -> Preset:
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise ValueError(f"preset: unknown '{cfg.preset}'; use one of {', '.join(PRESETS)}")
        return PRESETS[cfg.preset]
    from .methods import method_spec

    return PRESETS[f"{family}-{method_spec(cfg).preset.value}-{tier}"]  # DreamBooth-full trains like full


def _precision(value: str, device: str, bf16: bool) -> str:
    """A preset's "bf16" is for CUDA: fp16 where the GPU lacks bf16, fp32 ("no") on the CPU and Apple MPS."""
    if value == "no" or device != "cuda":
        return "no"
    return value if bf16 or value == "fp16" else "fp16"


def load_precision(cfg: TrainConfig, device: str, bf16: bool = True) -> str:
    """The mixed precision, known before the model loads (its frozen weights load in it): the explicit value, the
    named preset's, or the device's (every family's preset for a device agrees on it)."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    preset = PRESETS.get(cfg.preset or "") or PRESETS[f"sd1-{cfg.method}-{'cpu' if device == 'cpu' else 'gpu40'}"]
    return _precision(preset.values["mixed_precision"], device, bf16)


@dataclass
class Resolved:
    """A config with every preset field filled, and where each value came from."""

    cfg: TrainConfig
    preset: str
    from_preset: dict  # field -> value the preset supplied (explicit values are not listed)
    found_trigger: str | None = None  # the trigger word found in the captions (none was given)

    def summary(self) -> str:
        vals = ", ".join(f"{k} {v}" for k, v in self.from_preset.items())
        line = f"preset {self.preset}: {vals}" if vals else f"preset {self.preset}: every value given explicitly"
        if self.found_trigger:
            line += (f"; trigger '{self.found_trigger}' (a word of every caption this model does not know; "
                     "a trigger word given (--trigger) picks another)")
        return line


def resolve(cfg: TrainConfig, family: str, device: str, native_size: int, memory_bytes: int | None = None,
            bf16: bool = True, found_trigger: str | None = None) -> Resolved:
    """Fill the unset fields of ``cfg`` from its preset (``cfg.preset`` or the one for family / device / method);
    ``found_trigger`` is the trigger when none was given."""
    if found_trigger and not cfg.trigger:
        cfg = replace(cfg, trigger=found_trigger)
    else:
        found_trigger = None
    preset = pick(cfg, family, device_tier(device, memory_bytes))
    filled = {}
    for name in PRESET_FIELDS:
        if getattr(cfg, name) is not None:
            continue
        value = preset.values.get(name)
        if name == "resolution" and value is None:
            value = native_size
        if name in PER_RUN and value:  # the preset gives how many per run
            value = max(1, (cfg.steps or preset.values["steps"]) // value)
        if name == "mixed_precision":
            value = _precision(value, device, bf16)
        if name == "num_class_images" and (cfg.class_data or not (cfg.class_prompt or cfg.class_word)):
            value = 0  # generated prior images need a class prompt or word; own class images need none
        if name == "trigger_token" and value and (not cfg.trigger or cfg.train_text_encoder):
            value = False  # a new token needs a trigger word (given, or found); a trained text encoder has its own
        if name == "token_lr" and not filled.get("trigger_token", cfg.trigger_token):
            value = None  # no new token: nothing trains at that rate
        if value is not None:  # rank and the like mean nothing to textual inversion or a full fine-tune
            filled[name] = value
    return Resolved(replace(cfg, **filled), preset.name, filled, found_trigger)


def trigger_in(cfg: TrainConfig, captions: list[str], tokenizer) -> str | None:
    """The trigger a LoRA or DreamBooth run without --trigger takes: the made-up word its captions share
    (data.find_trigger), judged by the model's tokenizer; None when one was given or none is found."""
    from .data import find_trigger
    from .methods import method_spec

    if cfg.trigger or tokenizer is None or not method_spec(cfg).lora:
        return None
    return find_trigger(captions, lambda w: len(tokenizer.tokenize(w)) == 1)


def describe(cfg: TrainConfig, captions: list[str] | None = None) -> str:
    """Before a run (the Training tab): the preset for ``cfg``'s model, method and this device, what it sets, and
    the trigger it will find in ``captions`` (the data's, an instance prompt for those without)."""
    import torch

    from ..models import peek, peek_tokenizer, pick_device
    from .estimate import available_bytes

    seen = peek(cfg.model)
    if seen is None:
        return "The preset is chosen when the model has been downloaded (at the start of the run)."
    device = pick_device("auto")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    found = trigger_in(cfg, captions, peek_tokenizer(cfg.model)) if captions else None
    return resolve(cfg, seen[0], device, seen[1], available_bytes(device), bf16, found).summary()
