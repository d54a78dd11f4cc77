"""The training engine proven on the embedded model (issues 5 and 16): LoRA (its preset alone) and DreamBooth teach
it a shape it has never seen (a bar, bound to a trigger word, from 12 generated images), textual inversion one
token for a compound ("red star"); prompts of the base world keep >= 90 % of the base model's accuracy. Judged
by pixels (``sd_demo.shapes.novel``), like the embedded model itself. Skips where the embedded model is not built.

Measured on the shipped model (Euler a, CFG 2.5, 20 steps; ordinary accuracy on 64 held-out prompts; the
experiments' driver and logs are listed in the issue-5 notes). What made the proofs pass:

- Canonical captions ("a red zkring on a blue background"), the style of the trigger prompts. Training on the full
  captions (size and position named) and prompting without them left small bars as blobs (9/16 at best).
- Class images (DreamBooth) of ground truth: the training scenes with each base shape instead of the bar. Class
  images the base model generates carry its own mistakes (16 % wrong shapes); with them ordinary colour fell to
  72-81 % or shape to 66 %, at 11-15/16 bars.
- The LoRA leaves cross-attention keys, values and output alone (TARGETS). With them, 15/16 bars but ordinary
  colour 56-69 % in two of three runs; without any cross-attention LoRA, colour and shape stay at base level but
  the bar binds in only 10-11/16. The query alone, at rank 32, gives both: 15/16 bars, shape 88 % and colour 95 %
  against 81 / 97 % without the adapter at batch 4, but training seed 1 then gave 11/16 bars and colour 86 %
  (87 % needed). At batch 8 both seeds pass: 14/16 bars, shape 77 / 75 %, colour 97 / 88 %; seed 1 is one image
  above the colour bar.
- A plain LoRA on the bars alone draws every object as a bar (ordinary shape 84 -> 9 %): nothing in its data says
  what sets the bar apart. The issue-5 proof put the shapes the model knows into the same folder (14/16 bars,
  ordinary 81 / 94 %); since issue 16 the LoRA preset needs none: output preservation on the model's own world
  keeps ordinary prompts and the trigger, a new token trained beside the LoRA, binds the bar (15/16, see
  BENCHMARKS.md).
- Textual inversion: one vector learnt "red star" in 3-13/16 depending on the captions; two vectors (one per word
  it replaces) 14/16 and 15/16 over two training seeds, against 12/16 for the spelled-out prompt.
The ring (the first concept tried) has a hole under two latent pixels wide when small; see ``novel``.
"""
from __future__ import annotations

import pytest

from sd_demo import models

pytestmark = pytest.mark.skipif(not (models.EMBEDDED_DIR / "model_index.json").exists(),
                                reason="embedded model not built (assets/shapes-sd is missing)")

BAR = "zkring"  # not a word of the embedded vocabulary: the tokenizer spells it in byte pieces
N_TRIGGER = 16  # trigger-prompt samples judged per method
KEEP = 0.90  # share of the base model's accuracy ordinary prompts must keep
ORDINARY = ("shape", "color", "background")


def _generate(model, prompts):
    from sd_demo.generate import GenerationParams, generate

    return [generate(model, GenerationParams(prompt=p, steps=20, seed=i)).images[0]  # the card's CFG scale
            for i, p in enumerate(prompts)]


def _ordinary(model) -> dict[str, float]:
    """Accuracy on 64 held-out prompts of the base world: with 16 or 32 the 90 % keep-check was at the mercy of 2
    or 3 images (one standard error of a 90 % rate is 7.5 points on 16 prompts, 3.8 on 64)."""
    from sd_demo.shapes.eval_model import heldout_prompts, run_eval

    report = run_eval(model, heldout_prompts(64, seed=1), seeds=[0], steps=20, guidance=model.default_guidance).report
    return {a: report.accuracy(a) for a in ORDINARY}


@pytest.fixture(scope="module")
def base():
    """The embedded model and its accuracy on ordinary (held-out) prompts without any adapter."""
    model = models.load_model("embedded")
    return model, _ordinary(model)


@pytest.fixture(scope="module")
def bar_data(tmp_path_factory):
    from sd_demo.shapes.novel import bar_scenes, write_dataset

    return write_dataset(bar_scenes(12, seed=0), BAR, tmp_path_factory.mktemp("bars"), "canonical")


def _bar_prompts() -> list[str]:
    """Colours and backgrounds the 12 training images did not all show, any size and position (seeded)."""
    from sd_demo.shapes.novel import bar_scenes

    return [ns.caption(BAR, "canonical") for ns in bar_scenes(N_TRIGGER, seed=77)]


def _shapes_it_knows(folder, n: int = 24):
    """The training scenes with the bar replaced by each base shape in turn, as rendered by the world: what a user
    has of the shapes the model already draws: DreamBooth's class images."""
    from sd_demo.shapes.novel import bar_scenes, with_base_shapes, write_dataset

    return write_dataset(with_base_shapes(bar_scenes(12, seed=0), n), BAR, folder, "canonical")


# LoRA on self-attention, the cross-attention query and the ResNet convolutions. Not on the cross-attention keys,
# values and output: they carry every word of every prompt into the image, and with them the colour words drifted
# (green drew black, blue green: ordinary colour 94 -> 56-69 %). Rank 32: rank 16 bound the bar in 12/16.
TARGETS = "attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,conv1,conv2"
LORA = dict(rank=32, alpha=32.0, lr=1e-3, steps=600, target_modules=TARGETS)


def _config(method, data, out, **kw):
    from sd_demo.train.config import TrainConfig

    base = dict(method=method, model="embedded", data=str(data), out=str(out), resolution=128, batch=4, seed=0,
                snr_gamma=5.0, validation_every=0, checkpoint_every=0,  # the proofs judge the final weights only
                preserve=0.0)  # the issue-5 recipes as measured (the LoRA preset now adds output preservation)
    base.update(kw)
    return TrainConfig(**base)


def _check_adapter(base, adapter_dir, judge, prompts, need: float):
    """Trigger prompts show the concept; ordinary prompts keep KEEP of the base accuracy."""
    model, base_acc = base
    model.set_loras([(str(adapter_dir), 1.0)])
    try:
        shown = [judge(im) for im in _generate(model, prompts)]
        kept = _ordinary(model)
    finally:
        model.set_loras([])
    assert sum(shown) >= need * len(prompts), f"concept shown in {sum(shown)}/{len(prompts)} trigger samples"
    for a in ORDINARY:
        assert kept[a] >= KEEP * base_acc[a], f"{a}: {kept[a]:.0%} after training vs {base_acc[a]:.0%} before"


def test_base_model_never_draws_the_new_concepts(base):
    from sd_demo.shapes.novel import object_is_pink, shows_bar

    model, _ = base
    images = _generate(model, _bar_prompts())
    assert sum(shows_bar(im) for im in images) <= 2
    pink = _generate(model, [p.replace(BAR, "pink circle") for p in _bar_prompts()[:8]])
    assert not any(object_is_pink(im) for im in pink)


@pytest.mark.slow  # about 4 minutes on 2 cores; .ci/run runs it (the default run keeps under 15 minutes)
def test_lora_with_only_the_required_options_learns_a_new_shape(base, bar_data, tmp_path):
    """What a user gets from `train --method lora --model embedded --data DIR --out OUT`: the preset finds the
    trigger (the made-up word every caption shares), trains it as a new token beside the LoRA and keeps the
    adapter's answers to the model's own world equal to the base model's (output preservation), so the 12 bars
    alone are enough. benchmarks/train_defaults.py measures the same run with its wall time (BENCHMARKS.md); here
    live samples and checkpoints are off, which changes no weight."""
    from sd_demo.shapes.novel import shows_bar
    from sd_demo.train.config import TrainConfig
    from sd_demo.train.loop import train

    result = train(TrainConfig(method="lora", model="embedded", data=str(bar_data), out=str(tmp_path / "out"),
                               validation_every=0, checkpoint_every=0))
    assert result.preset.preset == "embedded-lora-cpu" and result.preset.found_trigger == BAR
    _check_adapter(base, tmp_path / "out", shows_bar, _bar_prompts(), need=13 / 16)


@pytest.mark.slow  # about 5 minutes on 2 cores (600 steps of 8 instance + 8 class images): run with -m slow
def test_dreambooth_learns_a_new_shape_with_prior_preservation(base, bar_data, tmp_path):
    """DreamBooth-LoRA with prior preservation on the user's own class images (--class-data): the training scenes
    with the bar replaced by each base shape in turn, so instance and class captions differ in the shape word
    alone and the prior keeps every shape word meaning its shape while the trigger learns the bar. Batch 8 (of each
    stream): at batch 4 one of two training seeds failed the keep-check."""
    from sd_demo.shapes.novel import shows_bar
    from sd_demo.train.loop import train

    classes = _shapes_it_knows(tmp_path / "class")
    train(_config("dreambooth", bar_data, tmp_path / "out", trigger=BAR, class_data=str(classes),
                  **{**LORA, "batch": 8}))
    _check_adapter(base, tmp_path / "out", shows_bar, _bar_prompts(), need=0.8)
    model, _ = base
    model.set_loras([(str(tmp_path / "out"), 1.0)])
    try:  # a class word keeps its meaning with the adapter loaded
        squares = _generate(model, ["a red square on a blue background"] * 4)
    finally:
        model.set_loras([])
    assert not any(shows_bar(im) for im in squares)


RSTAR = "<rstar>"  # textual inversion's new token: one word for "red star"


def _red_stars(n: int, seed: int):
    """``n`` seeded scenes of a red star (any size and position) on every background but red."""
    import numpy as np

    from sd_demo.shapes.vocab import Color, Shape
    from sd_demo.shapes.world import Scene, random_obj

    rng = np.random.default_rng(seed)
    bgs = [c for c in Color if c is not Color.RED]
    return [Scene(bgs[rng.integers(len(bgs))], [random_obj(rng, Shape.STAR, Color.RED)]) for _ in range(n)]


def _red_star_prompts(token: str) -> list[str]:
    """16 seeded canonical prompts ("a red star on a blue background") with "red star" written as ``token``."""
    from sd_demo.shapes.captions import caption

    return [caption(s, "canonical").replace("red star", token) for s in _red_stars(N_TRIGGER, seed=77)]


@pytest.mark.slow  # about 3 minutes on 2 cores; .ci/run runs it (the default run keeps under 15 minutes)
def test_textual_inversion_learns_one_token_for_a_red_star(base, tmp_path_factory, tmp_path):
    """Only the new token's embedding trains, so the UNet must already be able to draw the concept. Pink could not
    be reached: the embedding snapped to a palette colour (yellow, 0/16 pink after 300 steps at lr 0.1). So the
    token learns a compound the vocabulary has no single word for, "red star", judged against the base model
    drawing the spelled-out prompt: the token must do >= 90 % as well (a lower bar than 80 % absolute, because
    textual inversion can only reach what the base model draws). Two vectors behind the token (--num-vectors 2),
    like the two words it replaces; loaded the way the app loads a training output."""
    from sd_demo.shapes.captions import caption
    from sd_demo.shapes.evaluate import evaluate
    from sd_demo.shapes.world import render
    from sd_demo.train.loop import train

    data = tmp_path_factory.mktemp("rstar")
    for i, scene in enumerate(_red_stars(12, seed=0)):
        render(scene).save(data / f"{i:03d}.png")
        (data / f"{i:03d}.txt").write_text(caption(scene, "full").replace("red star", RSTAR))
    train(_config("textual-inversion", data, tmp_path, steps=300, lr=5e-2, trigger=RSTAR, init_word="object",
                  num_vectors=2))
    model, base_acc = base
    spelled = _red_star_prompts("red star")
    base_ok = sum(evaluate(p, im).ok for p, im in zip(spelled, _generate(model, spelled)))
    model.set_loras([(str(tmp_path), 1.0)])
    try:
        images = _generate(model, _red_star_prompts(RSTAR))
        kept = _ordinary(model)
    finally:
        model.set_loras([])
    token_ok = sum(evaluate(p, im).ok for p, im in zip(spelled, images))
    assert token_ok >= 0.9 * base_ok, f"token: {token_ok}/16 red stars; spelled out: {base_ok}/16"
    for a in ORDINARY:
        assert kept[a] >= KEEP * base_acc[a]
