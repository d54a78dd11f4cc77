"""Textual-inversion embeddings: finding them in a training output and loading them into a pipeline.

Formats (safetensors only): diffusers' ``learned_embeds.safetensors`` (``{token: vectors}``, the token is the key)
and A1111's ``emb_params`` (SD 1.x/2.x) or ``clip_l`` + ``clip_g`` (SDXL), whose token is the file name, as in A1111.
A multi-vector embedding ``(n, dim)`` becomes the tokens ``token``, ``token_1`` ...; diffusers expands the token in
prompts to all of them.
"""
from __future__ import annotations

from pathlib import Path

DIFFUSERS_FILE = "learned_embeds.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def is_embedding_file(path: Path) -> bool:
    """An A1111 or diffusers embedding file, as opposed to a LoRA (whose keys name layers)."""
    keys = _keys(path)
    return bool(keys) and (keys <= {"emb_params", "clip_l", "clip_g"} or (len(keys) == 1 and "lora" not in
                                                                          next(iter(keys)).lower()))


def find_embedding(folder: Path) -> Path | None:
    """The embedding a training output folder holds (textual inversion, or a LoRA trained with --trigger-token)."""
    path = Path(folder) / DIFFUSERS_FILE
    return path if path.is_file() else None


def _sdxl_vectors(folder: Path):
    """clip_g vectors of an SDXL embedding: the A1111 file beside diffusers' (which holds one encoder only)."""
    from safetensors.torch import load_file

    for path in sorted(folder.glob("*.safetensors")):
        if _keys(path) == {"clip_l", "clip_g"}:
            return load_file(str(path))["clip_g"]
    return None


def load_embedding(pipe, path: Path) -> str:
    """Load one embedding into ``pipe`` (both encoders for SDXL); returns the token prompts use."""
    from safetensors.torch import load_file

    path = Path(path)
    sd = load_file(str(path))
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if "emb_params" in sd or "clip_l" in sd:
        token = path.stem
        first, second = sd.get("emb_params", sd.get("clip_l")), sd.get("clip_g")
    else:
        (token, first), = sd.items()
        second = _sdxl_vectors(path.parent) if sdxl else None
    if sdxl and second is None:
        raise ValueError(f"{path.name} has no vectors for SDXL's second text encoder (clip_g)")
    if not sdxl and second is not None:
        raise ValueError(f"{path.name} is an SDXL embedding; load it with an SDXL model")
    pipe.load_textual_inversion({token: first}, token=token, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    if sdxl:
        pipe.load_textual_inversion({token: second}, token=token, tokenizer=pipe.tokenizer_2,
                                    text_encoder=pipe.text_encoder_2)
    return token
