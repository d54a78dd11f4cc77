"""Tiny, random, offline Stable Diffusion pipelines for tests.

Everything here is built in-process (no Hugging Face Hub access):

* ``make_clip_tokenizer``  - a real CLIP byte-level BPE tokenizer with a tiny vocabulary.
* ``build_tiny_sd``        - a full diffusers folder for "sd15", "sd2v" or "sdxl" (safetensors only).
* ``fill_hf_cache``        - copy such a folder into a Hub cache layout so ``snapshot_download`` /
                             ``from_pretrained(repo_id)`` work with ``HF_HUB_OFFLINE=1``.
* ``make_pickle_only``     - turn a saved folder into a pickle-only (``*.bin``) one.
* ``build_tiny_captioner`` - a random BLIP image-to-text model and processor (auto-captioning).
* ``build_tiny_taesd``     - a random tiny VAE (AutoencoderTiny), as TAESD or a model's own ``tiny_vae/``.

The models produce noise, not images; they only have the right *shapes* and *configs* so that
the real diffusers pipelines run end to end in well under a second on CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from sd_demo.shapes.tokenizer import build_vocab_and_merges

KINDS = ("sd15", "sd2v", "sdxl")

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP context length; also the text encoders' max_position_embeddings.

# Words that become single tokens ("red" -> "red</w>"). Anything else still tokenizes fine,
# just into several (sub)word pieces, exactly like the real CLIP tokenizer does for rare words.
TOKENIZER_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "picture",
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple",
    "circle", "square", "triangle", "star", "background", "small", "large",
    "cat", "dog", "house", "tree", "sky", "blurry", "ugly", "bad", "quality",
)


def make_clip_tokenizer(save_dir, words=TOKENIZER_WORDS, pad_token: str = EOS_TOKEN):
    """Write ``vocab.json``/``merges.txt`` for a tiny CLIP BPE, load it, ``save_pretrained`` it.

    ``pad_token`` is ``<|endoftext|>`` like SD 1.x; real SD 2.x / SDXL ``tokenizer_2`` use ``"!"``
    (an ordinary byte token, id 0), which is what ``build_tiny_sd`` passes for those.
    The vocab size is ``len(tokenizer)``; text encoders must be built with that ``vocab_size``.
    """
    from transformers import CLIPTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)  # the project's CLIP-layout BPE builder
    vocab_file = save_dir / "vocab.json"
    merges_file = save_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )

    # transformers 5: CLIPTokenizer is tokenizers-backed and takes `vocab=`/`merges=` (dict/list
    # or file paths). `vocab_file=`/`merges_file=` are *silently ignored* by the constructor and
    # you get a 3-token tokenizer; those names only work through from_pretrained().
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )
    # Writes tokenizer.json + tokenizer_config.json next to vocab.json/merges.txt, so both the
    # fast path and the legacy vocab/merges path of from_pretrained() find the same tokenizer.
    tokenizer.save_pretrained(save_dir)
    return tokenizer


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

# Shared scheduler settings of SD 1.x / 2.x / XL (scaled_linear betas, 1000 train steps).
_SCHEDULER_BASE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
)


def _text_encoder(vocab_size: int, *, hidden_act: str, with_projection: bool = False, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=32,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        # BOS/EOS are the last two ids, as in the real CLIP vocab. eos_token_id != 2 makes
        # CLIP pool at the first EOS instead of the legacy argmax(input_ids).
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(*, scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    # 4 blocks => 3 downsamples => vae_scale_factor 8, like real SD: 64 px <-> 8x8 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    ).eval()


def _unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=8,  # pipelines default to sample_size * vae_scale_factor = 64 px
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def _build_pipeline(kind: str, tmp_tok_root: Path):
    """Instantiate the (unsaved) pipeline object for `kind`. Tokenizers are staged under tmp_tok_root."""
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    if kind == "sd15":
        tokenizer = make_clip_tokenizer(tmp_tok_root / "tokenizer")
        vocab_size = len(tokenizer)
        # Same scheduler class/config as runwayml/stable-diffusion-v1-5.
        scheduler = PNDMScheduler(
            **_SCHEDULER_BASE, skip_prk_steps=True, set_alpha_to_one=False, prediction_type="epsilon"
        )
        return StableDiffusionPipeline(
            vae=_vae(scaling_factor=0.18215, force_upcast=True),
            text_encoder=_text_encoder(
                vocab_size, hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id
            ),
            tokenizer=tokenizer,
            unet=_unet(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    if kind == "sd2v":
        # SD 2.x (768-v): "!" padding, gelu text encoder, per-block head counts, linear
        # projections in the transformer blocks, v-prediction Euler scheduler.
        tokenizer = make_clip_tokenizer(tmp_tok_root / "tokenizer", pad_token="!")
        vocab_size = len(tokenizer)
        scheduler = EulerDiscreteScheduler(
            **_SCHEDULER_BASE, prediction_type="v_prediction", timestep_spacing="leading"
        )
        return StableDiffusionPipeline(
            vae=_vae(scaling_factor=0.18215, force_upcast=True),
            text_encoder=_text_encoder(vocab_size, hidden_act="gelu", pad_token_id=tokenizer.pad_token_id),
            tokenizer=tokenizer,
            unet=_unet(attention_head_dim=(2, 4), use_linear_projection=True),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    if kind == "sdxl":
        tokenizer = make_clip_tokenizer(tmp_tok_root / "tokenizer")
        tokenizer_2 = make_clip_tokenizer(tmp_tok_root / "tokenizer_2", pad_token="!")
        text_encoder = _text_encoder(
            len(tokenizer), hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id
        )
        text_encoder_2 = _text_encoder(
            len(tokenizer_2), hidden_act="gelu", with_projection=True, pad_token_id=tokenizer_2.pad_token_id
        )
        time_embed_dim = 8
        unet = _unet(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=1,
            # prompt_embeds = concat(text_encoder hidden, text_encoder_2 hidden) = 32 + 32.
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            # 6 micro-conditioning time ids (orig size, crop, target size), each embedded to
            # time_embed_dim, plus the pooled text_encoder_2 projection.
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        )
        # Same scheduler class/config as stabilityai/stable-diffusion-xl-base-1.0.
        scheduler = EulerDiscreteScheduler(
            **_SCHEDULER_BASE,
            prediction_type="epsilon",
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
        )
        return StableDiffusionXLPipeline(
            vae=_vae(scaling_factor=0.13025, force_upcast=True),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,  # the watermark package is optional and not needed here
        )

    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def build_tiny_sd(kind: str, out_dir, seed: int = 0) -> Path:
    """Build a tiny random pipeline of `kind` ("sd15" | "sd2v" | "sdxl") and save it to `out_dir`.

    The folder has the standard diffusers layout (model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/, plus text_encoder_2/ and tokenizer_2/ for SDXL) with safetensors
    weights only. Weights are deterministic for a given seed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".tokenizers-staging"
    torch.manual_seed(seed)
    try:
        pipe = _build_pipeline(kind, staging)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        # transformers 5 only writes tokenizer.json/tokenizer_config.json; real SD repos ship the
        # legacy vocab.json/merges.txt too, so add them for code that looks for those files.
        for tok_dir in staging.iterdir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copyfile(tok_dir / name, out_dir / tok_dir.name / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Hugging Face Hub cache
# --------------------------------------------------------------------------------------------

# Files the Hub stores through Git LFS (their cache blob is named by sha256, not git sha1).
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5", ".gguf")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fill_hf_cache(cache_dir, repo_id: str, model_dir, revision: str = "main") -> Path:
    """Copy `model_dir` into a Hub cache under `cache_dir` as model repo `repo_id`; return the snapshot.

    Layout (what huggingface_hub itself writes)::

        models--{org}--{name}/blobs/<etag>          file contents (sha256 for LFS files, git sha1 else)
        models--{org}--{name}/snapshots/<commit>/.. relative symlinks to the blobs (copies if symlinks fail)
        models--{org}--{name}/refs/<revision>       the commit hash (skipped if revision is a hash)
        models--{org}--{name}/trees/<commit>.json   huggingface_hub>=2 tree listing, so
                                                    get_cached_repo_tree() also works offline

    The fake commit hash is derived from the repo id and file contents, so it is deterministic.
    """
    cache_dir = Path(cache_dir)
    model_dir = Path(model_dir)
    repo_root = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{model_dir} holds no files")

    entries = {}
    blobs = {}
    for path in files:
        rel = path.relative_to(model_dir).as_posix()
        data = path.read_bytes()
        if path.name.endswith(_LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            # For LFS files git stores a pointer file; its sha1 is the tree's blob_id.
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            entry = {"size": len(data), "blob_id": _git_blob_sha1(pointer.encode()),
                     "lfs_sha256": sha256, "lfs_size": len(data)}
            etag = sha256
        else:
            etag = _git_blob_sha1(data)
            entry = {"size": len(data), "blob_id": etag}
        entries[rel] = entry
        blobs[rel] = (etag, path)

    is_hash = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    if is_hash:
        commit = revision
    else:
        digest = hashlib.sha1(repo_id.encode())
        for rel in sorted(entries):
            digest.update(f"{rel}:{blobs[rel][0]}\n".encode())
        commit = digest.hexdigest()

    snapshot = repo_root / "snapshots" / commit
    (repo_root / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, (etag, src) in blobs.items():
        blob = repo_root / "blobs" / etag
        if not blob.exists():
            shutil.copyfile(src, blob)
        dest = snapshot / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        try:
            # Relative link like huggingface_hub makes, so the cache can be moved as a whole.
            os.symlink(os.path.relpath(blob, dest.parent), dest)
        except OSError:  # e.g. Windows without symlink rights: the hub falls back to copies too
            shutil.copyfile(blob, dest)

    if not is_hash:
        (repo_root / "refs").mkdir(parents=True, exist_ok=True)
        # No trailing newline: huggingface_hub reads the file verbatim as the commit hash.
        (repo_root / "refs" / revision).write_text(commit)

    trees = repo_root / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    (trees / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": entries}, indent=1, sort_keys=True)
    )
    return snapshot


# --------------------------------------------------------------------------------------------
# Pickle-only variant
# --------------------------------------------------------------------------------------------


def _bin_name(safetensors_name: str) -> str:
    # model.safetensors -> pytorch_model.bin (transformers); diffusion_pytorch_model.safetensors ->
    # diffusion_pytorch_model.bin (diffusers). Variants keep their infix: model.fp16.safetensors ->
    # pytorch_model.fp16.bin.
    stem = safetensors_name[: -len(".safetensors")]
    if stem == "model" or stem.startswith("model."):
        stem = "pytorch_" + stem
    return stem + ".bin"


def make_pickle_only(model_dir) -> list[Path]:
    """Replace every ``*.safetensors`` under `model_dir` with a ``torch.save``d ``.bin``.

    Use on a plain saved folder (before ``fill_hf_cache``), e.g. to check that the app refuses
    repos that only ship pickle weights. Returns the written ``.bin`` paths.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if any(model_dir.rglob("*.safetensors.index.json")):
        raise NotImplementedError("sharded checkpoints are not supported (tiny models are never sharded)")
    written = []
    for st_path in sorted(model_dir.rglob("*.safetensors")):
        target = st_path.with_name(_bin_name(st_path.name))
        torch.save(load_file(st_path), target)
        st_path.unlink()
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# Captioner
# --------------------------------------------------------------------------------------------

CAPTION_WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TOKENIZER_WORDS)


def build_tiny_captioner(out_dir, seed: int = 0) -> Path:
    """A random BLIP captioning model (32-px images, 2 layers) with its processor, saved as safetensors. Its
    captions are random words of ``TOKENIZER_WORDS``, which is all a test of the plumbing needs."""
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out = Path(out_dir)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(CAPTION_WORDS)}, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: CAPTION_WORDS.index(w) for w in ("[PAD]", "[SEP]", "[DEC]")}
    text = dict(vocab_size=len(CAPTION_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=ids["[DEC]"],
                eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    processor.save_pretrained(out)
    return out


def build_tiny_lora(model_dir, out) -> None:
    """A LoRA for a tiny SD 1.x model whose weights are not zero (peft's default B = 0 would change nothing)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))


def build_tiny_taesd(out) -> Path:
    """A random AutoencoderTiny (TAESD's class) with 8 channels, saved as safetensors in ``out``."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).save_pretrained(out)
    return Path(out)
