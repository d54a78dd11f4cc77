"""Resolve a model, load each component on its own, assemble the pipeline, pick device / dtype / attention.

A model spec is a Hub repo id (optionally ``id@revision``), a local diffusers folder, or ``embedded``.
Components are loaded one by one (not ``DiffusionPipeline.from_pretrained``) so that we control exactly which
classes and files are used: safetensors only, never remote code or custom pipelines.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import logging
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError

# Loading prints a tqdm bar per component and a note about torchvision (we need no image processor): our own
# progress reporting replaces them, and an app log full of bars hides what matters.
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel  # noqa: E402
from diffusers.hooks import ModelHook  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from . import hub, openvino_blocks
from .hooks import hooked
from .sampling.registry import DEFAULT_SAMPLER

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DIR = ASSETS / "shapes-sd"
DEFAULT_GUIDANCE = 7.0  # A1111's CFG scale, for models whose card recommends none
DEFAULT_STEPS = 20  # A1111's step count, likewise
DEVICES = ("auto", "cuda", "mps", "cpu")
# On the embedded model's 9 M UNet parameters Fast was 5 % slower with bf16 autocast, on SD 1.5's 860 M 1.6-1.7x
# faster (BENCHMARKS.md, session 22)
AUTOCAST_MIN_PARAMS = 100_000_000
DTYPES = {"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ATTENTION = ("auto", "sdpa", "xformers")
# A tiny VAE (AutoencoderTiny) for the tiny_vae switch: a model folder's own tiny_vae/ (`shapes train-tiny-vae`
# makes one), else TAESD for SD's latent spaces (madebyollin's, the one A1111 and ComfyUI use)
TINY_VAE_DIR = "tiny_vae"
TINY_VAES = {"sd1": "madebyollin/taesd", "sd2": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
SD_VAE_SCALES = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}  # the VAEs TAESD was distilled from
TINY_VAE_RETRY_S = 60.0
COMPILERS = ("torch", "openvino")  # --compile's choices (compile_pipeline)
WARM_UP = {"torch": "the first image at each new size", "openvino": "the first image and the first after a LoRA change"}
AUTOCAST_HOOK = "sd_demo_autocast"
MAX_SPEC = 4096  # PATH_MAX: a longer name is neither a folder here nor a Hub id


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. ``source`` is 'hub', 'local' or 'embedded'."""

    source: str
    name: str  # repo id, folder path, or "embedded"
    revision: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name

    @property
    def hub_id(self) -> str | None:
        """The Hub repo this model is, also for a folder inside the HF cache (.../models--org--name/snapshots/rev);
        None for other folders and the embedded model."""
        if self.source == "hub":
            return self.name
        if self.source == "local":
            parts = Path(self.name).resolve().parts
            for i, part in enumerate(parts[:-2]):
                if part.startswith("models--") and parts[i + 1] == "snapshots" and part.count("--") >= 2:
                    return part[len("models--"):].replace("--", "/", 1)
        return None

    @property
    def public_name(self) -> str:
        """A name to show or publish that holds no path of this machine: the Hub id, else the folder's name."""
        return self.label if self.source == "hub" else self.hub_id or Path(self.name).name


def public_name(spec: str) -> str:
    """What a public page may show of a model spec: its Hub id, or a folder's name, never a path of this machine."""
    try:
        return parse_model_ref(spec).public_name
    except ValueError:  # a folder that is not there (any more): still only its name
        return Path(str(spec)).name


_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"()\[\],;:]+/)+([^\s/'\"()\[\],;:]*)")


def public_text(text: str) -> str:
    """Free text (a job's log) as a public page may show it: each absolute path of this machine cut to its last
    part, as ``public_name`` does for a model."""
    return _ABS_PATH.sub(lambda m: m.group(1) or m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def parse_model_ref(spec: str) -> ModelRef:
    """'embedded' | existing folder | 'org/name[@rev]' -> ModelRef, or ValueError saying what is accepted."""
    if spec is not None and not isinstance(spec, str):
        raise ValueError("model: must be text (a Hub repo id, a local folder, or 'embedded')")
    spec = (spec or "").strip()
    if not spec:
        raise ValueError("model: empty; give a Hub repo id (org/name[@revision]), a local folder, or 'embedded'")
    if len(spec) > MAX_SPEC:
        raise ValueError(f"model: {len(spec)} characters is too long for a Hub repo id or a folder path")
    if spec == "embedded":
        return ModelRef("embedded", "embedded")
    try:
        path = Path(spec).expanduser()
    except (RuntimeError, ValueError):  # '~name' of no such user, or with a NUL byte: not a folder here
        path = Path(spec)
    if _is_dir(path):
        return ModelRef("local", str(path.resolve()))
    repo, _, rev = spec.partition("@")
    if hub.REPO_ID.match(repo) and not spec.startswith((".", "/", "~")):
        return ModelRef("hub", repo, rev or None)
    shown = repr(spec) if len(spec) <= 200 else repr(spec[:200]) + "…"  # one readable line (repr escapes \n)
    raise ValueError(
        f"unknown model {shown}: not a folder here and not a Hub repo id like 'org/name' or 'org/name@revision'"
    )


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    # a name too long for the filesystem, or holding a NUL byte or a lone surrogate (ValueError), is no folder here
    # (it may still be a Hub id)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- device and dtype


def pick_device(requested: str = "auto") -> str:
    if requested not in DEVICES:
        raise ValueError(f"device: '{requested}' is not one of {', '.join(DEVICES)}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA GPU is visible; use --device cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: mps requested but Apple MPS is not available; use --device cpu")
    return requested


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """CUDA and MPS run fp16 by default (bf16 selectable), the CPU fp32: fp16 matmuls on CPU are slow or missing."""
    if requested not in DTYPES:
        raise ValueError(f"dtype: '{requested}' is not one of {', '.join(DTYPES)}")
    if requested == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    if device == "cpu" and requested == "fp16":
        raise ValueError("dtype: fp16 is not supported on the CPU; use fp32 (default) or bf16")
    return DTYPES[requested]


def native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX-512 BF16 or AMX)? Elsewhere oneDNN emulates it, slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private: absent means no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------- attention


def _xformers_probe() -> None:
    """Import xformers and run one tiny kernel call: an import alone does not prove the CUDA kernels exist."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # xformers warns loudly when its build does not match torch
        import xformers.ops  # noqa: PLC0415  (optional dependency)

        q = torch.zeros(1, 8, 1, 32, device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)


def select_attention(requested: str, device: str) -> tuple[str, str]:
    """Return (backend, reason). 'auto' takes xformers only on CUDA when its probe succeeds, else PyTorch SDPA."""
    if requested not in ATTENTION:
        raise ValueError(f"attention: '{requested}' is not one of {', '.join(ATTENTION)}")
    if requested == "sdpa":
        return "sdpa", "PyTorch SDPA (forced)"
    if device != "cuda":
        if requested == "xformers":
            raise ValueError(f"attention: xformers needs a CUDA GPU but this run is on {device}; use --attention sdpa")
        return "sdpa", f"PyTorch SDPA (xformers needs CUDA; running on {device})"
    try:
        _xformers_probe()
    except Exception as exc:  # ImportError, or a build without kernels for this GPU / torch
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip(": ")
        if requested == "xformers":
            raise ValueError(f"attention: xformers is not usable here ({reason}); use --attention sdpa") from exc
        return "sdpa", f"PyTorch SDPA (xformers unavailable: {reason})"
    return "xformers", "xformers memory-efficient attention" + (" (forced)" if requested == "xformers" else "")


def apply_attention(pipe, backend: str) -> None:
    if backend == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    else:
        for module in (pipe.unet, pipe.vae):
            module.set_attn_processor(AttnProcessor2_0())


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A ready pipeline and what the UI / infotext need to know about it."""

    pipe: Any
    ref: ModelRef
    family: str  # "sd1", "sd2" or "sdxl"
    device: str
    dtype: torch.dtype
    attention: str
    attention_reason: str
    folder: Path
    default_size: int  # native resolution in px
    default_guidance: float = DEFAULT_GUIDANCE  # CFG scale when a request names none (the model card's)
    default_sampler: str = DEFAULT_SAMPLER  # sampler when a request names none (the model card's)
    default_steps: int = DEFAULT_STEPS  # steps when a request names none (the model card's: distilled models 1-8)
    examples: tuple[str, ...] = ()  # example prompts from the model card (its widget)
    base_scheduler_config: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time per pipeline
    preview_map: Any = None  # (W, b) latent -> RGB, fitted lazily by preview.py
    schedulers: dict = field(default_factory=dict)  # (sampler, schedule) -> scheduler, built on first use
    variants: dict = field(default_factory=dict)  # "img2img" / "inpaint" -> the same modules as that pipeline
    prompt_encoders: dict = field(default_factory=dict)  # clip skip -> prompts.PromptEncoder, built on first use
    loras: tuple = ()  # ((path or repo id, scale), ...) currently applied
    embedding_tokens: list = field(default_factory=list)  # textual-inversion tokens those brought in
    compiled: str = ""  # "torch" or "openvino" (compile_pipeline), "" when not
    tiny_vae: Any = None  # AutoencoderTiny, loaded on first use (load_tiny_vae)
    tiny_vae_name: str = ""  # where it came from, for the infotext
    tiny_vae_missing: str = ""  # why there is none, after a failed load
    tiny_vae_failed: float = 0.0  # when (time.monotonic): tried again only TINY_VAE_RETRY_S later, not every image

    @property
    def autocast_reason(self) -> str:
        """Why the ``autocast`` switch cannot speed this model up ("" when it can): it pays only for an fp32 model
        on a CPU that computes bf16 natively, and a compiled one runs graphs built for fp32 (OpenVINO's take fp32
        inputs only)."""
        if self.device != "cpu":
            return f"it is for the CPU; on {self.device} choose the precision with --dtype"
        if self.dtype != torch.float32:
            return f"the model already runs in {dtype_name(self.dtype)}"
        if self.compiled:
            return f"the model is compiled by {self.compiled} for fp32"
        if not native_bf16():
            return "this CPU has no native bf16 (AVX-512 BF16 or AMX), where it is slower than fp32"
        return ""

    @property
    def autocast_pays(self) -> bool:
        """Does Fast take autocast? Where it can run, and the UNet is big enough for bf16 matmuls to pay for their
        casts."""
        unet_params = sum(w.numel() for w in self.pipe.unet.parameters())
        return not self.autocast_reason and unet_params >= AUTOCAST_MIN_PARAMS

    def set_loras(self, loras: list[tuple[str, float]]) -> None:
        """Apply exactly these adapters, no-op when unchanged: LoRAs (diffusers or kohya format, safetensors only)
        and training outputs with a textual-inversion embedding (alone, or beside a --trigger-token LoRA)."""
        from .embeddings import LORA_FILE, find_embedding, is_embedding_file, load_embedding

        loras = tuple(loras)
        if loras == self.loras:
            return
        self.prompt_encoders.clear()  # they cache text-encoder outputs that a LoRA or an embedding changes
        if self.loras:
            self.pipe.unload_lora_weights()
            self._unload_embeddings()
        self.loras = ()
        names = []
        for i, (source, scale) in enumerate(loras):
            path = Path(source)
            if not path.exists() and not hub.REPO_ID.match(source):
                raise ValueError(f"lora: '{source}' not found; give a training run's name or output folder, a "
                                 ".safetensors file or a Hub repo id")
            try:
                embedding = (find_embedding(path) if path.is_dir() else
                             path if path.is_file() and path.suffix == ".safetensors" and is_embedding_file(path)
                             else None)
                has_lora = (path / LORA_FILE).is_file() if path.is_dir() else embedding is None
                if embedding is None and not has_lora:  # else the infotext would claim a LoRA that did nothing
                    raise ValueError(f"the folder holds neither {LORA_FILE} nor a textual-inversion "
                                     "embedding; give the LoRA's .safetensors file itself")
                if embedding is not None and not has_lora and scale != 1:
                    raise ValueError("it is a textual-inversion embedding, which has no strength; drop the "
                                     f"':{scale:g}'")
                if embedding is not None:
                    self.embedding_tokens.append(load_embedding(self.pipe, embedding))
                if has_lora:
                    self.pipe.load_lora_weights(source, adapter_name=f"lora{i}", use_safetensors=True)
                    names.append(f"lora{i}")
            except (OSError, ValueError, SafetensorError) as exc:
                self.pipe.unload_lora_weights()
                self._unload_embeddings()
                what = "not a readable .safetensors file: " if isinstance(exc, SafetensorError) else ""
                # named, not pathed: a public app's run names stand for folders of this machine (engine.lora_sources)
                raise ValueError(f"lora: '{hub.adapter_name(source)}' could not be loaded: "
                                 f"{what}{public_text(hub.first_line(exc))}") from exc
        if names:
            self.pipe.set_adapters(names, adapter_weights=[loras[int(n.removeprefix("lora"))][1] for n in names])
        self.loras = loras  # a compiled model compiles again: dynamo's guards see peft's new adapter layers

    def _unload_embeddings(self) -> None:
        if not self.embedding_tokens:
            return
        pairs = [(self.pipe.tokenizer, self.pipe.text_encoder)]
        if getattr(self.pipe, "text_encoder_2", None) is not None:
            pairs.append((self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        for tok, enc in pairs:
            added = [t for t in tok.added_tokens_encoder
                     if any(t == e or re.fullmatch(re.escape(e) + r"_\d+", t) for e in self.embedding_tokens)]
            if added:
                self.pipe.unload_textual_inversion(tokens=added, tokenizer=tok, text_encoder=enc)
        self.embedding_tokens = []

    @property
    def max_clip_skip(self) -> int:
        from .prompts import max_clip_skip

        return max_clip_skip(self.pipe, self.family == "sdxl")

    @property
    def prediction_type(self) -> str:
        return self.base_scheduler_config.get("prediction_type", "epsilon")

    def describe(self) -> str:
        return (
            f"{self.ref.public_name} · {self.family.upper()} ({self.prediction_type}) · {self.device} "
            f"{dtype_name(self.dtype)} · attention: {self.attention_reason}"
            + (f" · compiled by {self.compiled} ({WARM_UP[self.compiled]} waits for it)"
               if self.compiled else "")
        )


def parse_lora(spec: str) -> tuple[str, float]:
    """'PATH_OR_REPO[:SCALE]' -> (source, scale); the scale defaults to 1."""
    if not isinstance(spec, str):  # an API caller's number or null: AttributeError before
        raise ValueError("lora: must be text ('path_or_repo' or 'path_or_repo:scale')")
    source, sep, scale = spec.rpartition(":")
    if sep and source:
        try:
            value = float(scale)
        except ValueError:
            return spec, 1.0  # not a scale: part of the name
        if not math.isfinite(value):  # 'x:nan' was taken as a NaN adapter weight
            raise ValueError(f"lora: the scale of {spec!r} is not a finite number")
        return source, value
    return spec, 1.0


def parse_loras(text: str | None) -> list[tuple[str, float]]:
    """'a[:0.8], b' (the app's and the API's LoRA list) -> [(source, scale), ...]."""
    if text is not None and not isinstance(text, str):  # an API caller's true / 5 / list: AttributeError before
        raise ValueError("lora: must be text ('path_or_repo[:scale], ...')")
    return [parse_lora(x.strip()) for x in (text or "").split(",") if x.strip()]


def read_config(folder: Path, name: str) -> dict:
    """A model's JSON file (``model_index.json``, ``unet/config.json``) as a dict; a ValueError naming the file
    when it is missing or malformed."""
    path = Path(folder) / name
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"model: {name} is missing in {folder}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model: {path} is not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"model: {path} is not a JSON object")
    return value


def detect_family(folder: Path) -> str:
    index = read_config(folder, "model_index.json")
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return "sdxl"
    unet_cfg = read_config(folder, "unet/config.json")
    # SD 2.x UNets project attention inputs linearly and cross-attend to 1024-d OpenCLIP features.
    return "sd2" if unet_cfg.get("use_linear_projection") or unet_cfg.get("cross_attention_dim") == 1024 else "sd1"


def native_size(folder: Path) -> int:
    """The model's training size in px: the UNet's latent side times the VAE's downsampling."""
    unet, vae = read_config(folder, "unet/config.json"), read_config(folder, "vae/config.json")
    try:
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model: unet/config.json sample_size or vae/config.json block_out_channels in {folder} "
                         f"is missing or not a number ({type(exc).__name__}: {exc})") from None


def _local_files(spec: str, patterns: list[str]) -> Path | None:
    """The folder of a model whose ``patterns`` files are on this machine (the embedded model, a local folder, or
    the Hub cache), never downloading; None when a Hub model is not cached."""
    from huggingface_hub import snapshot_download

    ref = parse_model_ref(spec)
    if ref.source == "embedded":
        return EMBEDDED_DIR
    if ref.source == "local":
        return Path(ref.name)
    try:
        return Path(snapshot_download(ref.name, revision=ref.revision, local_files_only=True,
                                      allow_patterns=patterns, cache_dir=hub.cache_dir()))
    except Exception:  # not cached
        return None


def peek(spec: str) -> tuple[str, int] | None:
    """(family, native size) from a model's config files alone, without loading or downloading weights; None when
    they are not on this machine yet (a Hub model not in the cache). Family 'embedded' for the shipped model."""
    folder = _local_files(spec, ["model_index.json", "unet/config.json", "vae/config.json"])
    if folder is None:
        return None
    try:
        family = "embedded" if parse_model_ref(spec).source == "embedded" else detect_family(folder)
        return family, native_size(folder)
    except (OSError, ValueError, KeyError):
        return None


def card_settings(folder: Path) -> tuple[float, str, int]:
    """(CFG scale, sampler, steps) that a request naming none gets from a model: its card's, else A1111's."""
    guidance = hub.recommended_guidance(folder)
    return (DEFAULT_GUIDANCE if guidance is None else guidance,  # 0 is real (distilled models)
            hub.recommended_sampler(folder) or DEFAULT_SAMPLER, hub.recommended_steps(folder) or DEFAULT_STEPS)


def peek_steps(spec: str) -> int:
    """The steps a request that names none gets from a model (its card's, else A1111's 20), without loading it."""
    folder = _local_files(spec, ["README.md"])
    return card_settings(folder)[2] if folder else DEFAULT_STEPS


def peek_tokenizer(spec: str) -> CLIPTokenizer | None:
    """A model's (first) tokenizer when its files are on this machine, without loading the model: what the
    Training tab needs to name the trigger it will find before a run starts. None when not here (not remembered,
    so a model downloaded later is seen)."""
    folder = _local_files(spec, ["tokenizer/*"])
    return _tokenizer(str(folder)) if folder else None


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str) -> CLIPTokenizer | None:
    try:
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    except (OSError, ValueError):
        return None


def load_scheduler(folder: Path) -> SchedulerMixin:
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    name = json.loads(cfg_path.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    # Only diffusers' own scheduler classes: a config must not be able to name arbitrary code.
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        log.warning("scheduler '%s' is not a diffusers scheduler; using EulerDiscreteScheduler", name)
        cls = diffusers.EulerDiscreteScheduler
    return cls.from_pretrained(folder, subfolder="scheduler")


def resolve_folder(ref: ModelRef, *, want_fp16: bool, allow_pickle: bool, tqdm_class=None) -> tuple[Path, hub.WeightPlan]:
    if ref.source == "embedded":
        if not (EMBEDDED_DIR / "model_index.json").exists():
            raise ValueError(
                "the embedded model is not built yet (assets/shapes-sd is missing); pass --model with a Hub id or folder"
            )
        folder = EMBEDDED_DIR
    elif ref.source == "local":
        folder = Path(ref.name)
    else:
        return hub.fetch_model(
            ref.name, ref.revision, want_fp16=want_fp16, allow_pickle=allow_pickle, tqdm_class=tqdm_class
        )
    # Checked before anything is listed: a folder given by mistake ('/', '~') fails at once, not after a walk.
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"model '{ref.label}' is not a diffusers model folder (it has no model_index.json)")
    return folder, hub.plan_download(_listing(folder), ref.label, want_fp16=want_fp16, allow_pickle=allow_pickle)


def _listing(folder: Path) -> list[str]:
    """A local pipeline's files as the Hub names them, two levels deep: model_index.json and <component>/<file>
    are all that plan_download reads (diffusers never nests deeper)."""
    try:
        top = list(folder.iterdir())
        return [p.name for p in top if p.is_file()] + [
            f"{d.name}/{p.name}" for d in top if d.is_dir() for p in d.iterdir() if p.is_file()]
    except OSError as exc:
        raise ValueError(f"model: {exc.filename} is not readable ({exc.strerror})") from None


def _load_components(folder: Path, family: str, dtype: torch.dtype, plan: hub.WeightPlan, label: str) -> dict:
    kw = {"torch_dtype": dtype, "use_safetensors": not plan.pickle, "variant": plan.variant}
    tkw = {"dtype": dtype, "use_safetensors": not plan.pickle, "variant": plan.variant}  # transformers 5 spelling
    loaders = {
        "vae": lambda: AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw),
        "unet": lambda: UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **tkw),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        "scheduler": lambda: load_scheduler(folder),
    }
    if family == "sdxl":
        loaders["text_encoder_2"] = lambda: CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", **tkw)
        loaders["tokenizer_2"] = lambda: CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    comps = {}
    for name, load in loaders.items():
        try:
            comps[name] = load()
        # SafetensorError: a damaged weight file; ValueError / RuntimeError: weights that do not fit the config
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise ValueError(f"model '{label}': {name} could not be loaded ({hub.first_line(exc)})") from exc
    return comps


def assemble_pipeline(comps: dict, family: str):
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**comps)
    # No safety checker: like A1111 we leave content policy to the host; the components are the user's choice.
    return diffusers.StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@dataclass(frozen=True)
class LoadPlan:
    """What loading a model decided before any weights were read: a wrong id, folder or config fails while it is
    made, so a cache can keep serving the model it holds."""

    ref: ModelRef
    device: str
    dtype: torch.dtype
    attention: str
    attention_reason: str
    folder: Path
    weights: hub.WeightPlan
    family: str
    size: int  # native resolution in px
    compile: str = ""  # compile_pipeline after loading: one of COMPILERS, or "" for none


def plan_load(spec: str, *, device: str = "auto", dtype: str = "auto", attention: str = "auto",
              allow_pickle: bool = False, tqdm_class=None, compile: str = "") -> LoadPlan:
    """Resolve ``spec`` (downloading a Hub model's files) and read its configs; every mistake is one ValueError."""
    ref = parse_model_ref(spec)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    compile = compiler(compile)
    if compile == "openvino":
        openvino_blocks.check_available(dev, dt)
    backend, reason = select_attention(attention, dev)
    folder, weights = resolve_folder(ref, want_fp16=dt == torch.float16, allow_pickle=allow_pickle,
                                     tqdm_class=tqdm_class)
    return LoadPlan(ref, dev, dt, backend, reason, folder, weights, detect_family(folder), native_size(folder),
                    compile)


def load_planned(plan: LoadPlan) -> LoadedModel:
    """Read the weights of a planned model and assemble its pipeline; a damaged weight file is one ValueError."""
    comps = _load_components(plan.folder, plan.family, plan.dtype, plan.weights, plan.ref.label)
    pipe = assemble_pipeline(comps, plan.family).to(plan.device)
    pipe.set_progress_bar_config(disable=True)  # progress is reported through our own callback
    apply_attention(pipe, plan.attention)
    log.info("loaded %s (%s) on %s %s; attention: %s", plan.ref.label, plan.family, plan.device,
             dtype_name(plan.dtype), plan.attention_reason)
    guidance, sampler, steps = card_settings(plan.folder)
    model = LoadedModel(
        pipe=pipe,
        ref=plan.ref,
        family=plan.family,
        device=plan.device,
        dtype=plan.dtype,
        attention=plan.attention,
        attention_reason=plan.attention_reason,
        folder=plan.folder,
        default_size=plan.size,
        default_guidance=guidance,
        default_sampler=sampler,
        default_steps=steps,
        examples=tuple(hub.card_examples(plan.folder)),
        base_scheduler_config=dict(pipe.scheduler.config),
        compiled=plan.compile,
    )
    if plan.compile:
        compile_pipeline(model)
    return model


def load_tiny_vae(model: LoadedModel) -> str:
    """Load the model's tiny VAE once: its folder's TINY_VAE_DIR, else TAESD for its family from the Hub (cached
    when offline). Returns "" when it is ready, else one line saying why there is none."""
    if model.tiny_vae is None and time.monotonic() - model.tiny_vae_failed > TINY_VAE_RETRY_S:
        model.tiny_vae_missing = ""
        local = model.folder / TINY_VAE_DIR
        name = TINY_VAE_DIR if (local / "config.json").is_file() else TINY_VAES[model.family]
        scale = model.pipe.vae.config.scaling_factor
        if name != TINY_VAE_DIR and not math.isclose(scale, SD_VAE_SCALES[model.family], rel_tol=1e-3):
            model.tiny_vae_missing = (f"this model's VAE is not SD's (scaling factor {scale:g}), so {name} would "
                                      f"draw noise, and it has no {TINY_VAE_DIR}/ folder of its own")
            model.tiny_vae_failed = time.monotonic()
            return model.tiny_vae_missing
        try:
            folder = local if name == TINY_VAE_DIR else hub.fetch_files(
                name, ["config.json", "diffusion_pytorch_model.safetensors"])
            vae = diffusers.AutoencoderTiny.from_pretrained(folder, torch_dtype=model.dtype, use_safetensors=True)
            model.tiny_vae, model.tiny_vae_name = vae.to(model.device).eval(), name
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            model.tiny_vae_missing = f"{name} could not be loaded ({public_text(hub.first_line(exc))})"  # no local path
            model.tiny_vae_failed = time.monotonic()
            log.warning("tiny VAE: %s could not be loaded: %s", name, exc)
    return model.tiny_vae_missing


def compiler(value) -> str:
    """``--compile``'s value: "" (off), or one of COMPILERS (True, from older callers, is "torch")."""
    value = "torch" if value is True else (value or "")
    if value and value not in COMPILERS:
        raise ValueError(f"compile: '{value}' is not one of {', '.join(COMPILERS)}")
    return value


def compile_pipeline(model: LoadedModel) -> None:
    """Compile the model's UNet and VAE decoder in place (``--compile``): the same pixels, faster after a warm-up.
    "torch": torch.compile of the UNet and the VAE decoder, at each new size or batch (tens of seconds on a CPU;
    BENCHMARKS.md). On a CPU, inductor's freezing folds the weights into the graph (``compiled_run``) and
    channels_last suits its convolutions: without them compiling was slower there.
    "openvino": the blocks of the UNet and the VAE decoder through OpenVINO (``openvino_blocks``), the UNet's
    converted again when the LoRAs change."""
    pipe = model.pipe
    if model.compiled == "openvino":
        openvino_blocks.accelerate(pipe.unet, lambda: model.loras)
        openvino_blocks.accelerate(pipe.vae.decoder)
        return
    for module in (pipe.unet, pipe.vae.decoder):
        module.to(memory_format=torch.channels_last)
        module.compile()


def compiled_run(model: LoadedModel):
    """The context a compiled model runs (and so compiles) in: inductor's freezing on a CPU. A context value, as
    inductor's settings are: one set once at load time on the device thread was gone by the next call (each device
    call runs in a copy of its caller's context), and torch.compile's own options did not freeze."""
    if model.compiled != "torch" or model.device != "cpu":
        return contextlib.nullcontext()
    import torch._inductor.config as inductor

    return inductor.patch(freezing=True)  # applies to graphs traced without grad only: training is untouched


class _Autocast(ModelHook):
    """On a module: its forward under torch.autocast (bf16 matmuls and convolutions, the weights staying fp32), its
    output back in fp32, so the sampler's arithmetic and the pictures' conversion stay fp32."""

    def new_forward(self, module, *args, **kwargs):
        # cache_enabled=False: the cache would keep a bf16 copy of every weight (they require grad) until the call
        # ends, reused by nothing (one context a call); measured slower too (BENCHMARKS.md, session 22)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = self.fn_ref.original_forward(*args, **kwargs)
        return tree_map(lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v, out)


@contextlib.contextmanager
def autocast_run(model: LoadedModel, on: bool):
    """Within the block, the UNet and the VAE's decoder compute in bf16 (``on``; the caller has checked
    ``model.autocast_reason``)."""
    if not on:
        yield
        return
    with hooked(AUTOCAST_HOOK, [(model.pipe.unet, _Autocast()), (model.pipe.vae.decoder, _Autocast())]):
        yield


def load_model(spec: str, **kw) -> LoadedModel:
    """Load a pipeline for ``spec`` (keywords: those of ``plan_load``); every user mistake is one ValueError line."""
    return load_planned(plan_load(spec, **kw))


class PipelineCache:
    """Holds at most one loaded pipeline per (model, device, dtype); loading another frees the old one first, and
    a failed load leaves the old one serving."""

    def __init__(self):
        self._key: tuple | None = None
        self._plan: LoadPlan | None = None
        self._model: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    def get(self, spec: str, *, device="auto", dtype="auto", attention="auto", allow_pickle=False, tqdm_class=None,
            compile=""):
        dev = pick_device(device)
        key = (parse_model_ref(spec), dev, dtype_name(pick_dtype(dev, dtype)), attention, allow_pickle,
               compiler(compile))
        with self._lock:
            if self._key == key and self._model is not None:
                return self._model
            # A wrong id, folder or config fails here, before the working model is released.
            plan = plan_load(spec, device=dev, dtype=dtype, attention=attention, allow_pickle=allow_pickle,
                             tqdm_class=tqdm_class, compile=compile)
            old_key, old_plan = self._key, self._plan
            self.release()  # free the old weights before the new ones arrive: two SDXL models do not fit most GPUs
            try:
                self._model = load_planned(plan)
            except Exception:  # damaged weights: reload the old model rather than leave the next request none
                self._restore(old_key, old_plan)
                raise
            self._key, self._plan = key, plan
            return self._model

    def _restore(self, key: tuple | None, plan: LoadPlan | None) -> None:
        if plan is None:
            return
        try:
            self._model, self._key, self._plan = load_planned(plan), key, plan
        except Exception:  # its files changed meanwhile: nothing to serve, the next request loads again
            log.exception("could not reload %s after a failed model switch", plan.ref.label)

    def release(self) -> None:
        if self._model is None:
            return
        self._model, self._key, self._plan = None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
