"""Smoke tests for the offline tiny-model helpers in tests/tiny_models.py."""

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.tiny_models import (
    KINDS,
    build_tiny_sd,
    fill_hf_cache,
    make_clip_tokenizer,
    make_pickle_only,
)

# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_known_words_as_single_tokens(tmp_path):
    from transformers import CLIPTokenizer

    tok = make_clip_tokenizer(tmp_path / "tok")
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>",
    ]
    # 512 byte tokens + merges + BOS/EOS last (CLIP layout; "a</w>" is 320 as in real CLIP).
    # These change only if TOKENIZER_WORDS changes.
    assert len(tok) == 632
    assert ids == [630, 320, 541, 573, 631]
    assert tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>"

    # Reloads offline, both from tokenizer.json and from the legacy vocab.json/merges.txt alone.
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    padded = again("a red circle", padding="max_length", max_length=77).input_ids
    assert padded[:5] == ids and padded[5:] == [631] * 72
    (tmp_path / "tok" / "tokenizer.json").unlink()
    legacy = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert legacy("a red circle").input_ids == ids and legacy.model_max_length == 77

    # Unknown words still tokenize (into byte/sub-word pieces), never to <unk>.
    assert tok.decode(tok("a hexagon").input_ids, skip_special_tokens=True) == "a hexagon"


def test_tokenizer_sd2_style_pad(tmp_path):
    tok = make_clip_tokenizer(tmp_path / "tok", pad_token="!")
    assert tok.pad_token_id == 0  # "!" is the first byte token, like real SD 2.x
    assert tok("red", padding="max_length", max_length=6).input_ids == [630, 541, 631, 0, 0, 0]


# ---------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("kind", KINDS)
def test_build_load_and_run(kind, tmp_path):
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    model_dir = build_tiny_sd(kind, tmp_path / kind)
    build_s = time.perf_counter() - start

    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    expected_dirs = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if kind == "sdxl":
        expected_dirs |= {"text_encoder_2", "tokenizer_2"}
    assert "model_index.json" in files
    assert {f.split("/")[0] for f in files} - {"model_index.json"} == expected_dirs
    assert not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)  # safetensors only
    assert sum(f.endswith(".safetensors") for f in files) == (4 if kind == "sdxl" else 3)

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    expected_pred = "v_prediction" if kind == "sd2v" else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_pred

    start = time.perf_counter()
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    run_s = time.perf_counter() - start
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()
    # Generous bounds: the real numbers are ~0.1 s each on a laptop CPU.
    assert build_s < 10 and run_s < 10, (build_s, run_s)


def test_build_is_deterministic(tmp_path):
    def digests(d):
        return {
            p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*.safetensors"))
        }

    a = build_tiny_sd("sd15", tmp_path / "a")
    b = build_tiny_sd("sd15", tmp_path / "b")
    assert digests(a) == digests(b)


def test_fixture_dirs(tiny_model_dirs):
    assert set(tiny_model_dirs) == set(KINDS)
    assert all((d / "model_index.json").is_file() for d in tiny_model_dirs.values())


# ---------------------------------------------------------------------------- hub cache


def test_hf_cache_offline(hf_cache, tiny_model_dirs):
    from diffusers import DiffusionPipeline
    from huggingface_hub import get_cached_repo_tree, hf_hub_download, snapshot_download

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest
    for kind in KINDS:
        repo_id = f"tiny/{kind}"
        snap = snapshot_download(repo_id, cache_dir=hf_cache, local_files_only=True)
        assert os.path.isfile(os.path.join(snap, "unet", "diffusion_pytorch_model.safetensors"))
        index = hf_hub_download(repo_id, "model_index.json", cache_dir=hf_cache, local_files_only=True)
        assert open(index).read() == (tiny_model_dirs[kind] / "model_index.json").read_text()
        tree = {f.path for f in get_cached_repo_tree(repo_id, cache_dir=hf_cache)}
        assert "model_index.json" in tree and "vae/diffusion_pytorch_model.safetensors" in tree

    # diffusers resolves a repo id through the same cache without any network call.
    pipe = DiffusionPipeline.from_pretrained("tiny/sdxl", cache_dir=hf_cache, use_safetensors=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_fill_hf_cache_layout(tmp_path, tiny_model_dirs):
    snap = fill_hf_cache(tmp_path / "cache", "org/name", tiny_model_dirs["sd15"])
    repo = tmp_path / "cache" / "models--org--name"
    assert snap.parent == repo / "snapshots" and len(snap.name) == 40
    assert (repo / "refs" / "main").read_text() == snap.name
    unet = snap / "unet" / "diffusion_pytorch_model.safetensors"
    # LFS-style blob: named by the sha256 of its content.
    assert unet.resolve().parent == (repo / "blobs").resolve()
    assert unet.resolve().name == hashlib.sha256(unet.read_bytes()).hexdigest()
    # Same inputs -> same fake commit.
    assert fill_hf_cache(tmp_path / "cache", "org/name", tiny_model_dirs["sd15"]) == snap


def test_hf_cache_via_env_var(hf_cache):
    # HF_HUB_CACHE is read when huggingface_hub is imported, hence a fresh interpreter.
    env = dict(os.environ, HF_HUB_CACHE=str(hf_cache), HF_HUB_OFFLINE="1")
    code = "from huggingface_hub import snapshot_download as s; print(s('tiny/sd15'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(hf_cache / "models--tiny--sd15" / "snapshots"))


# ---------------------------------------------------------------------------- pickle-only


def test_make_pickle_only(tmp_path):
    from diffusers import DiffusionPipeline

    model_dir = build_tiny_sd("sd15", tmp_path / "m")
    written = make_pickle_only(model_dir)
    assert {p.relative_to(model_dir).as_posix() for p in written} == {
        "text_encoder/pytorch_model.bin",
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
    }
    assert not list(model_dir.rglob("*.safetensors"))
    # The .bin files use the names the libraries look for: a default load still works ...
    DiffusionPipeline.from_pretrained(model_dir)
    # ... while insisting on safetensors fails, which is what the app should do.
    with pytest.raises(OSError):
        DiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
