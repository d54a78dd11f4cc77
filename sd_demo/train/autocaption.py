"""Auto-captioning for the Training tab: a transformers image-to-text model (BLIP by default, as kohya_ss offers)
writes a caption for each image of the staged folder, and the trigger word is put in front of each.

The model comes from a local folder, the local Hub cache, or (when online) the Hub, downloaded once into that cache;
it is loaded for one pass and released, so its memory is free again for training. Weights are safetensors only and no
remote code runs.
"""
from __future__ import annotations

from pathlib import Path

from .data import add_trigger
from .staging import Staged, inventory, write_captions

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
# Florence-2 answers a task prompt; the other image-to-text models of transformers caption an image alone.
_TASK_PROMPT = {"florence2": "<CAPTION>"}
MAX_WORDS = 40


# What a captioner repo needs: configs, tokenizer files and safetensors weights (never pickles).
FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


def fetch_captioner(model_id: str) -> Path:
    """The captioner's local folder: ``model_id`` itself when it is a folder, else its Hub snapshot (from the cache
    when offline, else downloaded once into it)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    from .. import hub

    try:
        return Path(snapshot_download(model_id, cache_dir=hub.cache_dir(), local_files_only=hub.is_offline(),
                                      allow_patterns=FILES))
    except Exception as exc:  # every hub failure becomes one actionable line
        raise ValueError(f"captioner: {hub.hub_error(model_id, None, exc)}") from exc


def load_captioner(model_id: str, device: str = "cpu"):
    """(processor, model) of a transformers image-to-text model, safetensors only, no remote code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = fetch_captioner(model_id)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"captioner: '{model_id}' could not be loaded as an image-to-text model: "
                         f"{str(exc).splitlines()[0]}") from exc
    return processor, model.to(device).eval()


def caption_images(processor, model, paths: list[Path], batch: int = 8) -> list[str]:
    """One caption per image: lower-case words, whitespace collapsed, at most MAX_WORDS words."""
    import torch
    from PIL import Image

    prompt = _TASK_PROMPT.get(model.config.model_type)
    out = []
    for k in range(0, len(paths), batch):
        images = []
        for p in paths[k:k + batch]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        kwargs = {"text": [prompt] * len(images)} if prompt else {}
        inputs = processor(images=images, return_tensors="pt", **kwargs).to(model.device)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=60)
        for text in processor.batch_decode(ids, skip_special_tokens=True):
            out.append(" ".join(text.lower().split()[:MAX_WORDS]))
    return out


def caption_folder(folder: Path, model_id: str = DEFAULT_CAPTIONER, trigger: str | None = None,
                   overwrite: bool = False, device: str = "cpu") -> tuple[Staged, int]:
    """Caption the folder's images that have no caption (all of them with ``overwrite``), the trigger in front of
    each new caption, written beside the images like the caption table's edits. Returns the new inventory and how
    many captions were written."""
    staged = inventory(folder)
    todo = [rel for rel, cap in staged.rows if overwrite or not cap]
    if not todo:
        return staged, 0
    processor, model = load_captioner(model_id, device)
    try:
        texts = caption_images(processor, model, [folder / rel for rel in todo])
    finally:
        del model
    rows = [(rel, add_trigger(text, trigger)) for rel, text in zip(todo, texts) if text or trigger]
    return write_captions(folder, rows), len(rows)
