"""Output preservation (--preserve) on the tiny SD 1.x model: it keeps the adapter's answers to other prompts near the
base model's, --resume still equals an uninterrupted run, and it is refused where there is no adapter to switch off."""
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sd_demo.train.config import TrainConfig
from sd_demo.train.loop import train

OTHER = ["a blue circle", "a green triangle", "a yellow star on a black background", "a white square"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("preserve_data")
    for i in range(4):
        Image.new("RGB", (64, 64), (200, 40 * i, 40)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text("a red square")
    (d.parent / "other.txt").write_text("\n".join(OTHER) + "\n")
    return d


def config(model, data, out, **kw):
    base = dict(method="lora", model=str(model), data=str(data), out=str(out), steps=8, resolution=64, batch=2,
                rank=4, alpha=4.0, lr=2e-2, seed=1, grad_accum=2, caption_dropout=0.2, random_flip=True,
                snr_gamma=5.0, validation_every=0, checkpoint_every=0, preserve_prompts=str(data.parent / "other.txt"),
                preserve=4.0, preserve_batch=1)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def _drift(model_dir, loras: list) -> list[float]:
    """Per LoRA folder: mean squared difference between its UNet's and the base UNet's noise predictions for a
    prompt the data never had, on fixed noisy latents at several timesteps."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    emb = pipe.encode_prompt(OTHER[1], "cpu", 1, False)[0].repeat(4, 1, 1)  # (4, 77, d)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([50, 300, 600, 900])
    base = pipe.unet(x, t, encoder_hidden_states=emb).sample
    drift = []
    for folder in loras:
        pipe.load_lora_weights(str(folder))
        drift.append((pipe.unet(x, t, encoder_hidden_states=emb).sample - base).pow(2).mean().item())
        pipe.unload_lora_weights()
    return drift


def test_preservation_keeps_other_prompts_near_the_base_model(tiny_model_dirs, data_dir, tmp_path):
    model = tiny_model_dirs["sd15"]
    on, off = tmp_path / "on", tmp_path / "off"
    with_preserve = train(config(model, data_dir, on))
    without = train(config(model, data_dir, off, preserve=0.0, preserve_prompts=None))
    drift_on, drift_off = _drift(model, [on, off])
    print(f"drift {drift_on:.3e} with preservation, {drift_off:.3e} without")
    assert drift_on < 0.5 * drift_off, f"other prompt drifted {drift_on:.2e} with preservation, {drift_off:.2e} without"
    # the same instance batches, noise and timesteps: preservation draws after them, and adds nothing at the first
    # step, where the adapter is still a no-op (B = 0)
    assert with_preserve.losses[0] == pytest.approx(without.losses[0], abs=1e-7)
    assert with_preserve.losses[1:] != pytest.approx(without.losses[1:], abs=1e-7)


@pytest.mark.parametrize("kw", [{}, dict(trigger="sks", class_word="circle,star", preserve_swap=1)], ids=["", "swap"])
def test_resume_with_preservation_equals_an_uninterrupted_run(tiny_model_dirs, data_dir, tmp_path, kw):
    model = tiny_model_dirs["sd15"]
    whole = train(config(model, data_dir, **kw, out=tmp_path / "whole", steps=6))
    cancel = threading.Event()
    part = tmp_path / "part"
    first = train(config(model, data_dir, **kw, out=part, steps=6),
                  on_event=lambda ev: cancel.set() if ev.step == 3 else None, cancel=cancel)
    assert first.steps == 3
    resumed = train(config(model, data_dir, **kw, out=part, steps=6, resume="latest"))
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    a, b = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (part, tmp_path / "whole"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("kw, needle", [
    (dict(method="textual-inversion", trigger="<tok>"), "is for --method lora or dreambooth"),
    (dict(method="full"), "is for --method lora or dreambooth"),
    (dict(preserve=0.0), "needs --preserve > 0"),
    (dict(preserve_batch=3), "between 0 and --batch"),
])
def test_preservation_is_refused_where_it_cannot_apply(data_dir, tmp_path, kw, needle):
    with pytest.raises(ValueError, match=needle):
        config("embedded", data_dir, tmp_path, **kw).validate()


def test_other_models_need_prompts_or_a_class_word(tiny_model_dirs, data_dir, tmp_path):
    from sd_demo.train.preserve import preservation_prompts

    cfg = config(tiny_model_dirs["sd15"], data_dir, tmp_path, preserve_prompts=None)
    with pytest.raises(ValueError, match="--preserve-prompts"):
        preservation_prompts(cfg, embedded=False, captions=["sks, a red square"])
    cfg = config(tiny_model_dirs["sd15"], data_dir, tmp_path, preserve_prompts=None, trigger="sks",
                 class_word="circle")
    assert preservation_prompts(cfg, embedded=False, captions=["sks, a red square"]) == ["circle, a red square"]
    world = preservation_prompts(config("embedded", data_dir, tmp_path, preserve_prompts=None), True, [])
    assert len(set(world)) > 100 and not any("sks" in p for p in world)


def test_swap_rows_ask_the_instance_latents_under_another_word():
    """--preserve-swap N: N more preservation rows per micro-batch, on the batch's first N noisy latents at their
    own timesteps, asking each caption with the trigger (as a word, any case) swapped for one of the words."""
    from sd_demo.train.data import trigger_pattern
    from sd_demo.train.preserve import Preserver

    asked = []

    def text(prompts):
        asked.extend(prompts)
        return {"encoder_hidden_states": torch.zeros(len(prompts), 77, 8)}

    p = Preserver(1.0, ["other"], 1, unet=None, adapters=[], swap=2, swap_words=("circle", "star"),
                  trigger=trigger_pattern("sks"))
    noisy, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    x, tt, cond = p.inputs(torch.Generator().manual_seed(0), noisy, t, {}, text,
                           captions=["SKS, a red bar", "a sks on blue", "sks"])
    assert torch.equal(x, noisy[[0, 0, 1]]) and tt.tolist() == [10, 10, 500]
    assert asked[0] == "other" and cond["encoder_hidden_states"].shape[0] == 3
    assert asked[1] in ("circle, a red bar", "star, a red bar") and asked[2] in ("a circle on blue", "a star on blue")
    asked.clear()  # a caption without the trigger (or dropped to "") gets no swap row: it would pull the concept back
    x, tt, _ = p.inputs(torch.Generator().manual_seed(0), noisy, t, {}, text, captions=["sks bar", "", "sks"])
    assert torch.equal(x, noisy[[0, 0]]) and tt.tolist() == [10, 10] and len(asked) == 2


def test_swap_rows_need_words_to_swap_in(tiny_model_dirs, data_dir, tmp_path):
    from sd_demo.train.preserve import swap_words

    assert swap_words(config("embedded", data_dir, tmp_path), embedded=True)[:2] == ("circle", "square")
    assert swap_words(config(model := tiny_model_dirs["sd15"], data_dir, tmp_path, class_word="cat, dog"),
                      embedded=False) == ("cat", "dog")
    with pytest.raises(ValueError, match="preserve_swap: on this model give --class-word"):
        swap_words(config(model, data_dir, tmp_path), embedded=False)
    with pytest.raises(ValueError, match="preserve_swap: 3 must be between 0 and --batch"):
        config(model, data_dir, tmp_path, preserve_swap=3).validate()
    with pytest.raises(ValueError, match="preserve_swap: on this model give --class-word"):
        config(model, data_dir, tmp_path, preserve_swap=1).validate()  # before the model loads
    with pytest.raises(ValueError, match="preserve_swap: needs --preserve > 0"):
        config(model, data_dir, tmp_path, preserve_swap=1, preserve=0.0, preserve_prompts=None,
               class_word="cat", trigger="sks").validate()


def test_swap_weight_weighs_only_the_swap_rows():
    """--preserve-swap-weight: the swap rows (the last ones of the batch's preservation rows) count that many times
    a scene row; at 1 the loss is the plain mean over every row, as before the option."""
    from sd_demo.train.data import trigger_pattern
    from sd_demo.train.preserve import Preserver

    def text(prompts):
        return {"encoder_hidden_states": torch.zeros(len(prompts), 77, 8)}

    pred, base = torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)
    pred[0] += 1.0  # the scene row misses by 1, the two swap rows by 2
    pred[1:] += 2.0
    for weight, expected in ((1.0, (1 + 4 + 4) / 3), (3.0, (1 + 12 + 12) / 3)):
        p = Preserver(0.5, ["other"], 1, unet=None, adapters=[], swap=2, swap_weight=weight,
                      swap_words=("circle",), trigger=trigger_pattern("sks"))
        p.inputs(torch.Generator().manual_seed(0), torch.randn(2, 4, 2, 2), torch.tensor([1, 2]), {}, text,
                 captions=["sks a", "sks b"])
        assert p.loss(pred, base).item() == pytest.approx(0.5 * expected)
    # a later batch without the trigger in its captions has no swap rows: its rows all weigh 1 again
    p.inputs(torch.Generator().manual_seed(0), torch.randn(2, 4, 2, 2), torch.tensor([1, 2]), {}, text,
             captions=["a", "b"])
    assert p.loss(pred[:1], base[:1]).item() == pytest.approx(0.5 * 1.0)
