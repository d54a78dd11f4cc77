"""Prompt weighting and long prompts, A1111 style, on top of compel.

Syntax (A1111's): ``(word)`` ×1.1, ``((word))`` ×1.21, ``[word]`` ÷1.1, ``(word:1.3)``, ``\\(`` for a literal
bracket, ``BREAK`` to start a new 75-token chunk. Prompts longer than 75 tokens are split into chunks (at a comma
or period near the end when there is one) and the chunk encodings are concatenated, as A1111 does.

compel does the encoding work (tokenising fragments, chunking, weighting); it does not read A1111's syntax, so
``parse_attention`` translates the text into compel's (fragment, weight) pairs. Weighting is compel's per-token
scaling of the distance from the empty prompt, ``z' = z_empty + w·(z − z_empty)``, for every weight (we skip
compel's blending for weights < 1 so that ``[word]`` is a scaling too, as in A1111).

A prompt with no weights, at most 75 tokens and clip skip 1 does not come here: the pipeline encodes it itself, so
plain prompts give exactly the images of stock diffusers.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from compel.embeddings_provider import EmbeddingsProvider, ReturnedEmbeddingsType, SplitLongTextMode

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for () and []
_TOKEN = re.compile(r"\\[\\()\[\]]|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|\bBREAK\b|[^\\()\[\]:B]+|.", re.S)


@dataclass
class WeightedPrompt:
    chunks: list[list[tuple[str, float]]]  # BREAK-separated parts, each a list of (text, weight)
    warnings: list[str] = field(default_factory=list)

    @property
    def is_plain(self) -> bool:
        return len(self.chunks) == 1 and all(w == 1.0 for _, w in self.chunks[0])


def _merge(frags: list[list]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for text, w in frags:
        if text and out and out[-1][1] == w:
            out[-1] = (out[-1][0] + text, w)
        elif text:
            out.append((text, w))
    return out


def parse_attention(text: str) -> WeightedPrompt:
    """A1111 attention syntax -> weighted fragments. Lenient like A1111; what it had to guess goes to ``warnings``."""
    chunks, frags, warnings = [], [], []
    stack: list[tuple[str, int]] = []  # open brackets: (kind, index in frags where it opened)

    def scale(start: int, factor: float) -> None:
        for f in frags[start:]:
            f[1] *= factor

    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\"):
            frags.append([tok[1:], 1.0])
        elif tok in "([":
            stack.append((tok, len(frags)))
        elif m.group(1) is not None and stack and stack[-1][0] == "(":
            try:
                weight = float(m.group(1))
            except ValueError:  # "(a:1.2.3)": A1111 keeps it as text and closes with the default 1.1
                weight = math.nan
            if math.isfinite(weight):
                scale(stack.pop()[1], weight)
            else:  # also a weight of 400 digits (inf: NaN conditioning, a black image), where A1111 takes inf
                frags.append([tok[:-1], 1.0])
                scale(stack.pop()[1], ROUND)
                warnings.append(f"weight '{m.group(1)[:20]}' is not a usable number; read as text")
        elif tok == ")" and stack and stack[-1][0] == "(":
            scale(stack.pop()[1], ROUND)
        elif tok == "]" and stack and stack[-1][0] == "[":
            scale(stack.pop()[1], SQUARE)
        elif tok == "BREAK":
            chunks.append(frags)
            frags, stack = [], []
        else:
            if tok in ")]":
                warnings.append(f"unmatched '{tok}' read as text")
            frags.append([tok, 1.0])
    for kind, start in stack:  # A1111 applies an unclosed bracket to the rest of the prompt
        scale(start, ROUND if kind == "(" else SQUARE)
        warnings.append(f"unclosed '{kind}' applies to the end of the prompt")
    # "(word:abc)": no number after the colon, so A1111 reads ":abc" as text inside a ×1.1 group. Say so.
    warnings += [f"weight '{w.strip()}' is not a number; read as text"
                 for w in re.findall(r"\([^()]*:([^()]*)\)", text) if not re.fullmatch(r"\s*[+-]?[.\d]+\s*", w)]
    chunks.append(frags)
    # each warning once: 8000 unclosed brackets made 8000 equal lines in the status
    return WeightedPrompt([_merge(c) for c in chunks], list(dict.fromkeys(warnings)))


class _LayerPicker(torch.nn.Module):
    """Wraps a CLIP text encoder so compel's 'last hidden state' is the layer A1111's clip skip asks for."""

    def __init__(self, encoder, clip_skip: int, sdxl: bool):
        super().__init__()
        self.encoder, self.clip_skip, self.sdxl = encoder, clip_skip, sdxl

    @property
    def device(self):
        return self.encoder.device

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        out = self.encoder(input_ids, output_hidden_states=True)
        if self.sdxl:  # SDXL conditions on the penultimate layer, not normalised (as diffusers and A1111 do)
            hidden = out.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip == 1:
            hidden = out.last_hidden_state  # already normalised
        else:
            # transformers < 5 nests the final norm under .text_model; 5.x keeps it on the model.
            norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm
            hidden = norm(out.hidden_states[-self.clip_skip])
        pooled = {k: getattr(out, k) for k in ("text_embeds", "pooler_output") if getattr(out, k, None) is not None}
        if "text_embeds" in pooled:  # compel takes pooler_output first; the projection model's pooled is text_embeds
            pooled.pop("pooler_output", None)
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=out.hidden_states, **pooled)


def max_clip_skip(pipe, sdxl: bool) -> int:
    """The largest clip skip the text encoder(s) have layers for, by _LayerPicker's indexing: SD reads
    hidden_states[-N] (N up to the layer count), SDXL hidden_states[-(N+1)] (it starts one layer back)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    layers = min(e.config.num_hidden_layers for e in encoders)
    return layers - 1 if sdxl else layers


def needs_encoding(prompts: list[WeightedPrompt], tokenizer, clip_skip: int, sdxl: bool) -> bool:
    """True when the pipeline's own prompt encoding would get it wrong (weights, > 75 tokens, SD clip skip)."""
    if (clip_skip > 1 and not sdxl) or not all(p.is_plain for p in prompts):
        return True
    limit = tokenizer.model_max_length - 2
    return any(len(tokenizer("".join(t for t, _ in p.chunks[0])).input_ids) - 2 > limit for p in prompts)


class PromptEncoder:
    """Weighted, chunked conditioning for one pipeline (SD 1.x/2.x: one encoder; SDXL: two, concatenated)."""

    def __init__(self, pipe, clip_skip: int = 1, sdxl: bool = False):
        self.pipe, self.sdxl = pipe, sdxl
        encoders = [(pipe.tokenizer, pipe.text_encoder)]
        if sdxl:
            encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.providers = [
            EmbeddingsProvider(
                tok, _LayerPicker(enc, clip_skip, sdxl), truncate=False, device=enc.device,
                returned_embeddings_type=ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED,
                split_long_text_mode=SplitLongTextMode.PHRASES, dtype_for_device_getter=lambda d: torch.float32,
            )
            for tok, enc in encoders
        ]

    @torch.no_grad()
    def _chunk(self, frags: list[tuple[str, float]]) -> torch.Tensor:
        texts, weights = [t for t, _ in frags] or [""], [w for _, w in frags] or [1.0]
        parts = []
        for p in self.providers:
            # a multi-vector embedding's token stands for all its tokens (diffusers' plain path does the same)
            texts_p = [self.pipe.maybe_convert_prompt(t, p.tokenizer) for t in texts]
            ids, w, mask = p.get_token_ids_and_expand_weights(texts_p, weights, device=p.device)
            parts.append(p.build_weighted_embedding_tensor(ids, w, mask, device=p.device))
        return torch.cat(parts, dim=-1)  # (1, 77·k, D) — SDXL: D = 768 + 1280

    def embeds(self, prompt: WeightedPrompt) -> torch.Tensor:
        return torch.cat([self._chunk(c) for c in prompt.chunks], dim=1)

    @torch.no_grad()
    def pooled(self, prompt: WeightedPrompt) -> torch.Tensor:
        """SDXL's pooled embedding: text_encoder_2's projection of the first chunk, weights ignored (as compel)."""
        text = "".join(t for t, _ in prompt.chunks[0])
        return self.providers[1].get_pooled_embeddings([text], device=self.providers[1].device)

    def pipeline_kwargs(self, prompt: WeightedPrompt, negative: WeightedPrompt, negative_is_empty: bool) -> dict:
        """prompt_embeds / negative_prompt_embeds (+ pooled for SDXL) padded to the same number of chunks."""
        dtype = self.pipe.unet.dtype
        pos, neg = self.embeds(prompt), self.embeds(negative)
        empty = self._chunk([])
        while pos.shape[1] < neg.shape[1]:
            pos = torch.cat([pos, empty], dim=1)
        while neg.shape[1] < pos.shape[1]:
            neg = torch.cat([neg, empty], dim=1)
        kw = {"prompt_embeds": pos.to(dtype)}
        zero_negative = self.sdxl and negative_is_empty and self.pipe.config.get("force_zeros_for_empty_prompt", False)
        kw["negative_prompt_embeds"] = (torch.zeros_like(neg) if zero_negative else neg).to(dtype)
        if self.sdxl:
            pooled, neg_pooled = self.pooled(prompt), self.pooled(negative)
            kw["pooled_prompt_embeds"] = pooled.to(dtype)
            kw["negative_pooled_prompt_embeds"] = (torch.zeros_like(neg_pooled) if zero_negative else neg_pooled).to(dtype)
        return kw
