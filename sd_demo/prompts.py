"""Prompt encoding that the diffusers pipelines do not cover for us.

Clip skip for SD 1.x/2.x: diffusers 0.42 reaches the final layer norm through ``text_encoder.text_model``, which
transformers 5 removed (CLIPTextModel is flat now), so the pipeline's own ``clip_skip`` crashes. We encode here and
hand the pipeline ``prompt_embeds`` instead. (SDXL's clip skip path does not touch ``text_model`` and is used as is.)
"""
from __future__ import annotations

import torch


def _final_layer_norm(text_encoder):
    # transformers < 5 nests the layers under .text_model; 5.x keeps them on the model itself.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


@torch.no_grad()
def encode_with_clip_skip(pipe, text: str, clip_skip: int) -> torch.Tensor:
    """(1, 77, D) conditioning from the ``clip_skip``-th last layer (A1111 numbering: 1 = the last layer)."""
    tok = pipe.tokenizer(
        text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    te = pipe.text_encoder
    out = te(tok.input_ids.to(te.device), output_hidden_states=True)
    if clip_skip == 1:
        hidden = out[0]  # last_hidden_state already has the final layer norm applied
    else:
        # hidden_states[0] is the embedding output, so the N-th last layer is hidden_states[-N].
        hidden = _final_layer_norm(te)(out.hidden_states[-clip_skip])
    return hidden.to(dtype=pipe.unet.dtype)
