"""A real CLIP byte-level BPE tokenizer for the embedded model, built offline from the shapes caption language.

Why by hand: nothing here may download the real CLIP vocabulary (49 408 tokens, which would also make the text
encoder's embedding table the largest tensor of the model). Instead we write ``vocab.json`` / ``merges.txt`` in
CLIP's exact format: the 256 byte symbols, their ``</w>`` variants, merge results, then ``<|startoftext|>`` and
``<|endoftext|>`` last. Merges are chained so every word of the caption language (and the parser's synonyms)
becomes one token; any other text still tokenizes into byte pieces, so users' free prompts never fail.
``transformers.CLIPTokenizer`` loads the files (note: transformers 5 takes ``vocab=``/``merges=``; the older
``vocab_file=`` names are silently ignored by the constructor).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP context length; the text encoder's max_position_embeddings

# Words users are likely to type around the caption language (synonyms the prompt parser accepts, and common
# Stable Diffusion filler) so they are single tokens too.
EXTRA_WORDS = (
    "violet", "disc", "disk", "plus", "tiny", "little", "big", "huge", "centre", "central", "centred", "middle",
    "upper", "lower", "backdrop", "bg", "circles", "squares", "triangles", "stars", "crosses", "shape", "object",
    "photo", "painting", "drawing", "image", "picture", "of", "and", "with", "the", "is", "plain", "simple",
    "blurry", "ugly", "bad", "quality", "best", "high", "low", "colour", "color",
)


def bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2 byte -> printable unicode table, in CLIP's vocabulary order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair (what `tokenizers` does)."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(p, float("inf")), i) for i, p in enumerate(zip(symbols, symbols[1:])))
        if rank == float("inf"):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_vocab_and_merges(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocab whose merges turn each of ``words`` (lowercase ASCII) into a single token."""
    alphabet = bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Earlier merges outrank new ones, so adding a word never changes how earlier words tokenize.
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols[0:2] = [pair[0] + pair[1]]
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    return vocab, merges


def caption_words(n_scenes: int = 3000, seed: int = 0) -> list[str]:
    """Every word of the caption language (all styles and phrasings), most frequent first, then EXTRA_WORDS."""
    from .captions import CaptionStyle, caption
    from .world import sample_scenes

    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for i, scene in enumerate(sample_scenes(n_scenes, seed, "all")):
        for style in CaptionStyle:
            for word in re.findall(r"[a-z]+", caption(scene, style, rng).lower()):
                counts[word] = counts.get(word, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return words + [w for w in EXTRA_WORDS if w not in counts]


def make_tokenizer(save_dir: Path | str, words=None):
    """Write vocab.json / merges.txt, load them as a CLIPTokenizer, save_pretrained next to them; return it."""
    from transformers import CLIPTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(caption_words() if words is None else words)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                         encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(save_dir / "vocab.json"), merges=str(save_dir / "merges.txt"),
                              pad_token=EOS_TOKEN, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(save_dir)  # tokenizer.json + tokenizer_config.json (vocab/merges kept alongside)
    return tokenizer
