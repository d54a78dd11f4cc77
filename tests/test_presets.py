"""Presets: what a user leaves unset follows the model family, the device and the method; what they set wins."""
import pytest

from sd_demo.train import estimate, presets
from sd_demo.train.config import TrainConfig

GIB = 2**30


def test_unset_values_follow_family_device_and_method():
    r = presets.resolve(TrainConfig(method="lora"), "embedded", "cpu", 128)
    assert r.preset == "embedded-lora-cpu" and r.cfg.resolution == 128  # the model's native size, not 512
    assert r.cfg.mixed_precision == "no" and r.cfg.gradient_checkpointing is False
    assert "attn2.to_v" not in r.cfg.target_modules  # cross-attention values carry every word: left alone
    assert r.cfg.preserve == 1.0 and r.cfg.batch == 4  # output preservation keeps ordinary prompts (see presets)
    sdxl = presets.resolve(TrainConfig(method="lora"), "sdxl", "cuda", 1024, 12 * GIB, bf16=False)
    assert sdxl.preset == "sdxl-lora-gpu8" and sdxl.cfg.resolution == 1024 and sdxl.cfg.batch == 1
    assert sdxl.cfg.gradient_checkpointing and sdxl.cfg.mixed_precision == "fp16"  # no bf16 on that GPU
    big = presets.resolve(TrainConfig(method="lora"), "sd1", "cuda", 512, 80 * GIB)
    assert big.preset == "sd1-lora-gpu40" and big.cfg.batch == 4 and big.cfg.mixed_precision == "bf16"
    assert not big.cfg.gradient_checkpointing
    ti = presets.resolve(TrainConfig(method="textual-inversion", trigger="<t>"), "sd2", "cpu", 768)
    assert ti.cfg.lr == 5e-3 and ti.cfg.resolution == 768 and "rank" not in ti.from_preset


def test_explicit_values_win_and_are_not_marked_as_the_presets():
    r = presets.resolve(TrainConfig(method="lora", lr=3e-4, resolution=96, steps=50), "embedded", "cpu", 128)
    assert (r.cfg.lr, r.cfg.resolution, r.cfg.steps) == (3e-4, 96, 50)
    assert not {"lr", "resolution", "steps"} & set(r.from_preset) and r.from_preset["rank"] == r.cfg.rank
    assert r.cfg.validation_every == 10 and r.cfg.checkpoint_every == 5  # per run, so they follow --steps
    assert r.summary().startswith("preset embedded-lora-cpu: rank 32")
    assert presets.resolve(TrainConfig(method="lora"), "sd1", "cpu", 512).cfg.preserve == 0.0  # needs class words


def test_the_embedded_lora_keys_on_a_new_token_for_the_trigger_found_in_the_captions():
    """Pivotal tuning on the embedded model (benchmarks/train_defaults.py): the trigger becomes a new token, given or
    found; with no trigger there is nothing to make a token of."""
    found = presets.resolve(TrainConfig(method="lora"), "embedded", "cpu", 128, found_trigger="zkring")
    assert found.cfg.trigger == "zkring" and found.cfg.trigger_token is True and found.cfg.token_lr == 5e-3
    assert "trigger 'zkring' (a word of every caption" in found.summary()
    given = presets.resolve(TrainConfig(method="lora", trigger="qq"), "embedded", "cpu", 128, found_trigger="zkring")
    assert given.cfg.trigger == "qq" and given.found_trigger is None  # a given trigger wins
    none = presets.resolve(TrainConfig(method="lora"), "embedded", "cpu", 128)
    assert none.cfg.trigger_token is False and none.cfg.token_lr is None
    te = presets.resolve(TrainConfig(method="lora", trigger="zk", train_text_encoder=True), "embedded", "cpu", 128)
    assert te.cfg.trigger_token is False  # the text encoder trains instead (the two exclude each other)
    off = presets.resolve(TrainConfig(method="lora", trigger_token=False), "embedded", "cpu", 128, found_trigger="zk")
    assert off.cfg.trigger_token is False and "trigger_token" not in off.from_preset
    assert presets.resolve(TrainConfig(method="lora", trigger="sks"), "sd1", "cpu", 512).cfg.trigger_token is False
    assert presets.resolve(TrainConfig(method="full"), "sd1", "cpu", 512).cfg.trigger_token is None
    # --num-vectors waits for the preset's token: fine on the embedded LoRA with a trigger, refused without one
    two = dict(method="lora", num_vectors=2, data="d", out="o")
    assert presets.resolve(TrainConfig(**two), "embedded", "cpu", 128, found_trigger="zk").cfg.validate()
    with pytest.raises(ValueError, match="num_vectors: is for"):
        presets.resolve(TrainConfig(**two), "sd1", "cpu", 512, found_trigger="zk").cfg.validate()


def test_the_trigger_is_the_made_up_word_every_caption_shares():
    from sd_demo.train.data import find_trigger

    known = {"a", "red", "blue", "on", "background", "green", "photo", "of", "sks", "dog"}.__contains__
    assert find_trigger(["a red zkring on a blue background", "Zkring, green on red"], known) == "zkring"
    assert find_trigger(["a photo of sks dog", "sks dog on red"], known) is None  # a known token: no new word
    assert find_trigger(["a red qq", "a blue zz"], known) is None  # no shared word
    assert find_trigger([], known) is None


def test_before_a_run_the_preset_note_names_the_trigger_the_captions_give():
    """The Training tab's note (presets.describe) reads the model's own tokenizer from disk, loads no weights."""
    captions = ["a red zkring on a blue background", "a zkring square on green"]
    note = presets.describe(TrainConfig(method="lora", model="embedded"), captions)
    assert note.startswith("preset embedded-lora-cpu") and "trigger 'zkring'" in note and "trigger_token True" in note
    assert "trigger '" not in presets.describe(TrainConfig(method="lora", model="embedded", trigger="qq"), captions)
    plain = presets.describe(TrainConfig(method="lora", model="embedded"), ["a red circle", "a red square"])
    assert "trigger '" not in plain and "trigger_token False" in plain  # words the model knows: none to find
    ti = presets.describe(TrainConfig(method="textual-inversion", model="embedded", trigger="<t>"), captions)
    assert "trigger '" not in ti


def test_named_presets_and_the_dreambooth_variants():
    named = presets.resolve(TrainConfig(method="lora", preset="sd1-lora-gpu16"), "sd1", "cpu", 512)
    assert named.preset == "sd1-lora-gpu16" and named.cfg.batch == 2
    assert named.cfg.mixed_precision == "no"  # bf16 is for CUDA: on this CPU the run stays fp32
    with pytest.raises(ValueError, match="preset: unknown 'sd1-lora'; use one of embedded-lora-cpu"):
        presets.resolve(TrainConfig(method="lora", preset="sd1-lora"), "sd1", "cpu", 512)
    full = presets.resolve(TrainConfig(method="dreambooth", trigger="sks", dreambooth_full=True, class_word="dog"),
                           "sd1", "cuda", 512, 24 * GIB)
    assert full.preset == "sd1-full-gpu16" and full.cfg.lr == 5e-6 and full.cfg.num_class_images == 100
    lora = presets.resolve(TrainConfig(method="dreambooth", trigger="sks"), "sd1", "cuda", 512, 24 * GIB)
    assert lora.cfg.lr == 1e-4 and lora.cfg.num_class_images == 0  # no class prompt or word: no prior images


def test_a_run_that_cannot_fit_is_refused_with_the_option_that_makes_it_fit(monkeypatch):
    from types import SimpleNamespace

    import torch

    unet = torch.nn.Linear(1000, 1000)  # 4 MB of weights stand in for the model
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(block_out_channels=[320]),
                                                parameters=unet.parameters),
                           device=torch.device("cuda"))
    cfg = presets.resolve(TrainConfig(method="lora"), "sd1", "cuda", 512, 24 * GIB).cfg  # batch 2, bf16
    need = estimate.peak_bytes(cfg, "sd1", pipe, 0)
    monkeypatch.setattr(estimate, "available_bytes", lambda device: int(need * 0.8))
    with pytest.raises(ValueError, match="add --gradient-checkpointing$"):
        estimate.check_fits(cfg, "sd1", pipe, 0, "cuda")
    monkeypatch.setattr(estimate, "available_bytes", lambda device: int(need * 0.4))
    with pytest.raises(ValueError, match="add --gradient-checkpointing --batch 1 --grad-accum 2"):
        estimate.check_fits(cfg, "sd1", pipe, 0, "cuda")
    monkeypatch.setattr(estimate, "available_bytes", lambda device: 4 * need)
    assert estimate.check_fits(cfg, "sd1", pipe, 0, "cuda").startswith("memory: about")
