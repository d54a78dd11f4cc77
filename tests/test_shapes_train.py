"""The embedded model's recipe (``python -m sd_demo.shapes train``) at toy scale: every stage runs from nothing, the
result is a plain diffusers StableDiffusionPipeline whose scheduler says how it was trained, ``--init`` continues
from it, and a fixed step count is reproducible bit for bit."""
import json

import pytest
import torch

from sd_demo.shapes.__main__ import main

TOY = ["--scenes", "48", "--vae-steps", "3", "--vae-minutes", "100", "--vae-batch", "4", "--vae-crop", "32",
       "--unet-steps", "3", "--batch", "4", "--warmup", "1", "--vae-channels", "8", "8", "8", "8",
       "--unet-channels", "16", "32", "--unet-norm-groups", "8", "--text-hidden", "32", "--text-layers", "1",
       "--te-steps", "2", "--threads", "1", "--log-every", "1"]


@pytest.fixture(autouse=True, scope="module")
def keep_torch_threads():
    """The recipe sets torch's thread count for its process (--threads); give later tests theirs back (a
    different count changes float reduction order, which exact-equality tests elsewhere would see)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    main(["train", "--out", str(out), *TOY])
    return out / "model"


def test_recipe_writes_a_plain_stable_diffusion_folder(toy_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_model, use_safetensors=True, torch_dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the recipe's default (see train.py)
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 16
    info = json.loads((toy_model / "train_info.json").read_text())
    assert info["unet_steps"] == 3 and info["vae_steps"] == 3 and "sd_demo.shapes train" in info["command"]
    assert (info["main_steps"], info["detail_steps"]) == (2, 1)  # --detail-share 0.22 of 3 steps
    assert not (toy_model.parent / "checkpoint").exists()  # the in-run checkpoint is removed at the end
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=128, width=128,
                 output_type="np").images[0]
    assert image.shape == (128, 128, 3)


def test_fixed_steps_are_reproducible_and_init_continues(toy_model, tmp_path):
    from safetensors.torch import load_file

    main(["train", "--out", str(tmp_path / "again"), *TOY])
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(toy_model / unet), load_file(tmp_path / "again" / "model" / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
    main(["train", "--out", str(tmp_path / "more"), "--init", str(toy_model), "--prediction", "epsilon", *TOY])
    cont = tmp_path / "more" / "model"
    assert load_file(cont / "vae/diffusion_pytorch_model.safetensors").keys() == \
        load_file(toy_model / "vae/diffusion_pytorch_model.safetensors").keys()
    assert json.loads((cont / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    c = load_file(cont / unet)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_text_encoder_stage_names_attributes_of_captions_it_never_read(tmp_path):
    """The stage before diffusion: a small encoder learns to read shape, colours, size and position (or "not
    said") from captions, and is right on captions of held-out scenes; an untrained one is not."""
    import numpy as np

    from sd_demo.shapes.captions import random_caption
    from sd_demo.shapes.tokenizer import make_tokenizer
    from sd_demo.shapes.train import (TrainConfig, attribute_accuracy, caption_for_training, make_text_encoder,
                                      pretrain_text_encoder)
    from sd_demo.shapes.world import sample_scenes

    torch.manual_seed(0)
    cfg = TrainConfig(out=tmp_path, text_hidden=64, text_layers=2, te_steps=200)
    tok = make_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(123)
    heldout = sample_scenes(200, 99, "heldout")
    unseen = [random_caption(s, rng) for s in heldout]
    te, heads = pretrain_text_encoder(cfg, sample_scenes(400, 0, "train"), tok)
    trained = attribute_accuracy(te, heads, tok, unseen)
    assert min(trained.values()) >= 0.97, trained
    # A made-up word where the shape goes (a trigger word, say) reads as "shape not said"; the rest still reads.
    odd = [caption_for_training(s, rng, unknown_share=1.0) for s in heldout]
    assert not any(s.obj.shape.value in t.split() for s, t in zip(heldout, odd))
    with_unknown = attribute_accuracy(te, heads, tok, odd)
    assert min(with_unknown.values()) >= 0.95, with_unknown
    untrained = attribute_accuracy(make_text_encoder(cfg, tok), heads, tok, unseen)
    assert max(untrained.values()) < 0.9, untrained


def test_a_text_encoder_neither_pretrained_nor_trained_is_refused(tmp_path):
    from sd_demo.shapes.train import TrainConfig, run

    with pytest.raises(ValueError, match="te_lr_scale: .* would stay random"):
        run(TrainConfig(out=tmp_path, te_steps=0, te_lr_scale=0.0))
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_the_training_engine_continues_the_recipes_model_with_full_fine_tuning(toy_model, tmp_path):
    """The Training tab's 'full' method takes the embedded model's kind of folder (v-prediction, 128 px, our own
    tokenizer) as its base and writes a model that loads and differs from it."""
    from diffusers import StableDiffusionPipeline

    from sd_demo.shapes.captions import caption
    from sd_demo.shapes.world import render, sample_scenes
    from sd_demo.train.config import TrainConfig
    from sd_demo.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for i, scene in enumerate(sample_scenes(4, 0)):
        render(scene).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption(scene, "full"))
    result = train(TrainConfig(method="full", model=str(toy_model), data=str(data), out=str(tmp_path / "out"),
                               steps=2, resolution=128, batch=2, lr=1e-3, train_text_encoder=True))
    assert len(result.losses) == 2 and all(loss == loss for loss in result.losses)
    tuned = StableDiffusionPipeline.from_pretrained(tmp_path / "out", use_safetensors=True)
    base = StableDiffusionPipeline.from_pretrained(toy_model, use_safetensors=True)
    assert tuned.scheduler.config.prediction_type == "v_prediction"
    for a, b in ((tuned.unet, base.unet), (tuned.text_encoder, base.text_encoder)):
        assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_train_tiny_vae_writes_a_tiny_vae_the_app_decodes_with(toy_model, tmp_path):
    """``train-tiny-vae`` distils an AutoencoderTiny into the model's tiny_vae/ (no config key diffusers would warn
    about), and a generation with tiny_vae decodes with it."""
    import shutil

    from sd_demo.generate import GenerationParams, generate
    from sd_demo.models import TINY_VAE_DIR, load_model

    model = tmp_path / "model"
    shutil.copytree(toy_model, model)
    main(["train-tiny-vae", "--model", str(model), "--steps", "3", "--scenes", "16", "--generated", "4",
          "--threads", "1"])
    config = json.loads((model / TINY_VAE_DIR / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny" and "block_out_channels" not in config
    assert not (model / f"{TINY_VAE_DIR}.tmp").exists()
    result = generate(load_model(str(model)), GenerationParams(prompt="a red circle", steps=2, seed=0,
                                                               tiny_vae=True))
    assert result.infotexts[0].params["Tiny VAE"] == TINY_VAE_DIR and not result.warnings
