"""What each training method makes trainable, and how its weights are saved, restored and exported."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ..embeddings import DIFFUSERS_FILE, LORA_FILE  # the names the app looks for in an output folder
from .config import Method, TrainConfig

TEXT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class MethodSpec:
    """One place for what a training method trains, how it is optimised, what it exports, how the result is
    loaded and what its card says; setup, the optimizer, the exporter, the card and the presets read it."""

    trains: str  # "lora" (an adapter on the UNet), "unet" (the whole UNet) or "tokens" (new embeddings only)
    preset: Method  # whose preset values it takes
    tag: str | None  # card tag (beside "lora" for adapters)
    tokens: bool = False  # new token embeddings too (textual inversion, or --trigger-token beside a LoRA)
    weight_decay: float = 1e-2  # AdamW; 0 for embeddings alone: decay would pull them towards zero

    @property
    def lora(self) -> bool:
        return self.trains == "lora"

    @property
    def is_model(self) -> bool:
        """The result is a whole model (loaded with --model), not an adapter on its base."""
        return self.trains == "unet"

    def card_skips(self) -> set[str]:
        """Hyper-parameters that mean nothing for this method (the card leaves them out)."""
        skip = set() if self.lora else {"rank", "alpha", "trigger_token", "target_modules", "preserve",
                                        "preserve_batch", "preserve_swap", "preserve_swap_weight"}
        skip |= set() if self.tokens else {"init_word", "num_vectors", "token_lr"}
        return skip | (set() if self.tag == "dreambooth" else {"num_class_images"})

    def usage(self, name: str, base_model: str, trigger: str | None) -> tuple[str, str]:
        """Python (diffusers) and command-line lines that use the result."""
        if self.is_model:
            return (f'pipe = DiffusionPipeline.from_pretrained("{name}")',
                    f'python -m sd_demo generate --model {name} --prompt "..."')
        lines = [f'pipe = DiffusionPipeline.from_pretrained("{base_model}")']
        if self.lora:
            lines.append(f'pipe.load_lora_weights("{name}")')
        if self.tokens:  # the trigger's embedding
            lines.append(f'pipe.load_textual_inversion("{name}")')
        example = f"a {trigger}" if trigger else "..."
        return "\n".join(lines), f'python -m sd_demo generate --model {base_model} --lora {name} --prompt "{example}"'

    def export(self, t: "Trainable", pipe, out: Path, cfg: TrainConfig) -> list[Path]:
        """The result's files in ``out``, each written whole or not at all: they are written into a staging folder
        beside them and renamed into place, so a kill or a full disk mid-export never leaves a half-written weights
        file where the Generate tab or another tool would load it."""
        stage = out / ".export-tmp"
        shutil.rmtree(stage, ignore_errors=True)  # a kill mid-export left it: only ever our own folder
        stage.mkdir(parents=True)
        try:
            files = export_lora(t, pipe, stage, cfg.alpha, name=out.resolve().name) if self.lora else []
            if self.is_model:
                files += export_full(pipe, stage)
            if self.tokens:  # diffusers and A1111 files of the trigger's embedding (beside a LoRA with --trigger-token)
                files += export_textual_inversion(t, cfg.trigger, stage)
            for f in sorted(p for p in stage.rglob("*") if p.is_file()):
                dest = out / f.relative_to(stage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return [out / f.relative_to(stage) for f in files]


SPECS = {
    Method.LORA: MethodSpec("lora", Method.LORA, None),
    Method.DREAMBOOTH: MethodSpec("lora", Method.DREAMBOOTH, "dreambooth"),
    Method.TEXTUAL_INVERSION: MethodSpec("tokens", Method.TEXTUAL_INVERSION, "textual-inversion", tokens=True,
                                         weight_decay=0.0),
    Method.FULL: MethodSpec("unet", Method.FULL, "full"),
}
DREAMBOOTH_FULL = MethodSpec("unet", Method.FULL, "dreambooth")  # --dreambooth-full: a whole UNet, like full


def method_spec(cfg: TrainConfig) -> MethodSpec:
    method = Method(cfg.method)
    spec = DREAMBOOTH_FULL if method == Method.DREAMBOOTH and cfg.dreambooth_full else SPECS[method]
    return replace(spec, tokens=True) if cfg.trigger_token and spec.lora else spec


@dataclass
class Trainable:
    """The modules a method trains. Checkpoints hold exactly ``named()``; everything else stays the base model."""

    modules: dict[str, torch.nn.Module]  # "unet" / "text_encoder" / "text_encoder_2" -> module with trainable parts
    trains_text_encoder: bool
    lora: bool = False
    extra: dict = field(default_factory=dict)

    def named(self) -> dict[str, torch.nn.Parameter]:
        return {f"{m}.{n}": p for m, mod in self.modules.items() for n, p in mod.named_parameters() if p.requires_grad}

    def token_embeddings(self) -> dict[str, "NewTokenEmbedding"]:
        """Encoder name -> its new-token rows: textual inversion's modules, or a LoRA's ``<encoder>_token``."""
        return {m.removesuffix("_token"): mod for m, mod in self.modules.items() if isinstance(mod, NewTokenEmbedding)}

    def new_token_ids(self) -> dict[str, int] | None:
        """Tokenizer attribute -> first new token id, when the text encoders train only new token rows (a caption
        without those ids then encodes the same at every step); else None."""
        tokens = self.token_embeddings()
        text = [m for m in self.modules if m.startswith("text_encoder")]
        if not tokens or len(tokens) != len(text):
            return None
        return {name.replace("text_encoder", "tokenizer"): emb.n_old for name, emb in tokens.items()}

    def params(self) -> list[torch.nn.Parameter]:
        return list(self.named().values())

    def param_groups(self, lr: float, text_encoder_lr: float | None = None, token_lr: float | None = None
                     ) -> list[dict]:
        """Optimizer groups: one, or with ``text_encoder_lr`` the text encoders' trained parts at that rate (kohya
        and the diffusers examples train the text encoder slower: it bends every prompt, not only the trigger).
        New-token rows trained beside a LoRA (--trigger-token) get their own group without weight decay, which
        would pull them towards zero, away from the vocabulary (textual inversion trains with none at all)."""
        named = self.named()
        token_ids = {id(m.new) for m in self.token_embeddings().values()}
        tokens = [p for p in named.values() if id(p) in token_ids]
        rest = {n: p for n, p in named.items() if id(p) not in token_ids}
        if not rest:
            return [{"params": tokens, "lr": lr}]
        unet = [p for n, p in rest.items() if n.startswith("unet.")]
        text = [p for n, p in rest.items() if not n.startswith("unet.")]
        if text_encoder_lr is None or not unet or not text:
            groups = [{"params": list(rest.values()), "lr": lr}]
        else:
            groups = [{"params": unet, "lr": lr}, {"params": text, "lr": text_encoder_lr}]
        if tokens:
            groups.append({"params": tokens, "lr": token_lr or text_encoder_lr or lr, "weight_decay": 0.0})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named().items()}

    def upcast(self) -> None:
        """fp32 master weights for everything trained, whatever dtype the base model loaded in: AdamW steps on fp16
        weights round small updates away, and accelerate's fp16 gradient scaler refuses fp16 gradients."""
        for p in self.params():
            p.data = p.data.float()

    @torch.no_grad()
    def load_state(self, weights: dict[str, torch.Tensor]) -> None:
        named = self.named()
        missing = set(named) - set(weights)
        if missing:
            raise ValueError(f"resume: the checkpoint lacks {len(missing)} trainable tensors (was it made with another "
                             "--method, --rank or --train-text-encoder?)")
        for k, p in named.items():
            if weights[k].shape != p.shape:
                raise ValueError(f"resume: the checkpoint's {k} has shape {tuple(weights[k].shape)}, this run's "
                                 f"{tuple(p.shape)} (was it made with another --rank or --num-vectors?)")
            p.copy_(weights[k])


class NewTokenEmbedding(torch.nn.Module):
    """The text encoder's token embedding plus trainable rows for new tokens (ids >= the old vocabulary size).

    Training a separate small parameter, not the whole table, keeps checkpoints and optimizer state tiny and
    guarantees the existing vocabulary cannot drift (no weight decay or rounding touches it).
    """

    def __init__(self, base: torch.nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base, self.n_old = base, base.num_embeddings
        self.new = torch.nn.Parameter(init.detach().clone().float())  # (n_new, dim)

    @property
    def weight(self):  # transformers reads .weight (dtype, device, resizing)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.n_old - 1))
        mask = ids >= self.n_old
        if mask.any():
            out = out.clone()
            out[mask] = self.new[ids[mask] - self.n_old].to(out.dtype)
        return out


def _token_embedding(encoder):
    # transformers 5 keeps the embeddings on the model; older versions under .text_model
    return getattr(encoder, "text_model", encoder).embeddings


def ti_tokens(trigger: str, n: int) -> list[str]:
    """The tokens behind a textual-inversion trigger: itself, then ``trigger_1`` ... (the names diffusers'
    ``load_textual_inversion`` gives a multi-vector embedding, and expands prompts to)."""
    return [trigger] + [f"{trigger}_{i}" for i in range(1, n)]


def _new_token_embeddings(cfg: TrainConfig, pipe) -> dict[str, NewTokenEmbedding]:
    """Add the trigger's tokens to each tokenizer and trainable rows for them to each text encoder."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    tokens = ti_tokens(cfg.trigger, cfg.num_vectors)
    mods = {}
    for name, (tok, enc) in zip(("text_encoder", "text_encoder_2"), pairs):
        vocab = tok.get_vocab()
        if any(t in vocab or f"{t}</w>" in vocab for t in tokens):
            raise ValueError(f"trigger: '{cfg.trigger}' is already a word of this model's vocabulary; use a new "
                             "token such as '<my-thing>'")
        init_ids = tok(cfg.init_word, add_special_tokens=False).input_ids
        if not init_ids:
            raise ValueError(f"init_word: '{cfg.init_word}' gives no token; use a plain word such as 'object'")
        tok.add_tokens(tokens)
        emb = _token_embedding(enc)
        pieces = emb.token_embedding.weight[init_ids]
        if len(tokens) == 1:  # one vector from several pieces: their mean
            init = pieces.mean(dim=0, keepdim=True)
        else:  # several vectors take the pieces in turn, as A1111 does ("red star" -> red, star, red, ...)
            init = pieces[torch.arange(len(tokens)) % len(init_ids)]
        emb.token_embedding = NewTokenEmbedding(emb.token_embedding, init)
        mods[name] = emb.token_embedding
    return mods


def _freeze(pipe) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)


def setup(cfg: TrainConfig, pipe) -> Trainable:
    _freeze(pipe)
    spec = method_spec(cfg)
    encoders = {n: getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    if spec.trains == "tokens":
        return Trainable(_new_token_embeddings(cfg, pipe), trains_text_encoder=True, extra={"ti": True})
    mods = {"unet": pipe.unet}
    if spec.is_model:
        pipe.unet.requires_grad_(True)
        if cfg.train_text_encoder:
            for name, enc in encoders.items():
                enc.requires_grad_(True)
                mods[name] = enc
        return Trainable(mods, cfg.train_text_encoder)
    targets = [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
    # Gaussian init of A with B = 0: the adapter starts as an exact no-op, as in the diffusers examples.
    pipe.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                     target_modules=targets))
    if cfg.train_text_encoder:
        for name, enc in encoders.items():
            enc.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                       target_modules=TEXT_LORA_MODULES))
            mods[name] = enc
    if spec.tokens:  # pivotal tuning: the UNet LoRA learns to answer a token that only the trigger has
        mods.update({f"{name}_token": emb for name, emb in _new_token_embeddings(cfg, pipe).items()})
    return Trainable(mods, cfg.train_text_encoder or spec.tokens, lora=True)


def lora_state_dicts(t: Trainable) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-format LoRA weights per module (keys without the adapter name), as diffusers' loaders expect."""
    return {name: get_peft_model_state_dict(mod) for name, mod in t.modules.items() if hasattr(mod, "peft_config")}


def export_lora(t: Trainable, pipe, out: Path, alpha: float, name: str | None = None) -> list[Path]:
    """pytorch_lora_weights.safetensors (diffusers) and <name>.safetensors (kohya: A1111, ComfyUI; by default
    named after ``out``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    sds = lora_state_dicts(t)
    kwargs = {f"{name}_lora_layers": convert_state_dict_to_diffusers(sd) for name, sd in sds.items()}
    # The adapter config (rank, alpha, targets) goes into the file's metadata; without it diffusers assumes
    # alpha = rank and would load an alpha != rank LoRA at the wrong strength.
    kwargs.update({f"{name}_lora_adapter_metadata": t.modules[name].peft_config["default"].to_dict() for name in sds})
    type(pipe).save_lora_weights(str(out), safe_serialization=True, **kwargs)
    flat = {f"{name}.{k}": v for name, sd in sds.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(flat)
    # diffusers writes alpha = rank (a scale of 1); ours may differ, and A1111 scales by alpha / rank.
    kohya = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    kohya_path = out / f"{name or out.resolve().name}.safetensors"
    save_file(kohya, str(kohya_path), metadata={"ss_network_dim": str(t.modules["unet"].peft_config["default"].r),
                                                "ss_network_alpha": str(alpha), "ss_network_module": "networks.lora"})
    return [out / LORA_FILE, kohya_path]


def export_textual_inversion(t: Trainable, trigger: str, out: Path) -> list[Path]:
    """learned_embeds.safetensors (diffusers: {token: vector}) and <token>.safetensors (A1111 embedding format)."""
    from safetensors.torch import save_file

    vectors = {name: mod.new.detach().float().contiguous() for name, mod in t.token_embeddings().items()}  # (n, dim)
    diffusers_path = out / DIFFUSERS_FILE
    first = vectors["text_encoder"]  # one vector is saved as (dim,), the layout single-token files have
    save_file({trigger: first[0] if len(first) == 1 else first}, str(diffusers_path))
    if "text_encoder_2" in vectors:  # A1111's SDXL embeddings name the two encoders
        a1111 = {"clip_l": vectors["text_encoder"], "clip_g": vectors["text_encoder_2"]}
    else:
        a1111 = {"emb_params": vectors["text_encoder"]}
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in trigger).strip("_") or "embedding"
    a1111_path = out / f"{safe_name}.safetensors"
    save_file(a1111, str(a1111_path))
    return [diffusers_path, a1111_path]


def export_full(pipe, out: Path) -> list[Path]:
    pipe.save_pretrained(str(out), safe_serialization=True)
    return [out / "model_index.json"]
