"""A1111 prompt syntax, weighting through compel, long prompts, and the untouched plain-prompt path."""
import numpy as np
import pytest
import torch

from sd_demo.generate import GenerationParams, generate
from sd_demo.prompts import PromptEncoder, parse_attention


@pytest.mark.parametrize("text,chunks", [
    ("a red circle", [[("a red circle", 1.0)]]),
    ("a (red) circle", [[("a ", 1.0), ("red", 1.1), (" circle", 1.0)]]),
    ("((red))", [[("red", pytest.approx(1.21))]]),
    ("[red]", [[("red", pytest.approx(1 / 1.1))]]),
    ("(red:1.3) circle", [[("red", 1.3), (" circle", 1.0)]]),
    ("(a [b]:2)", [[("a ", 2.0), ("b", pytest.approx(2 / 1.1))]]),
    (r"a \(b\) c", [[("a (b) c", 1.0)]]),
    ("red BREAK blue", [[("red ", 1.0)], [(" blue", 1.0)]]),
    ("(red:0.5)", [[("red", 0.5)]]),
])
def test_parse_attention(text, chunks):
    parsed = parse_attention(text)
    assert parsed.chunks == chunks and parsed.warnings == []


@pytest.mark.parametrize("text,chunks,warning", [
    ("(red:abc)", [[("red:abc", pytest.approx(1.1))]], "weight 'abc' is not a number"),
    ("(red circle", [[("red circle", pytest.approx(1.1))]], "unclosed '('"),
    ("red) circle", [[("red) circle", 1.0)]], "unmatched ')'"),
    ("[blue", [[("blue", pytest.approx(1 / 1.1))]], "unclosed '['"),
    ("(red:1.2.3)", [[("red:1.2.3", pytest.approx(1.1))]], "weight '1.2.3' is not a usable number"),
    ("(red:" + "9" * 400 + ")", [[("red:" + "9" * 400, pytest.approx(1.1))]], "is not a usable number"),  # was inf
])
def test_malformed_prompts_read_like_a1111_with_a_warning(text, chunks, warning):
    parsed = parse_attention(text)
    assert parsed.chunks == chunks and any(warning in w for w in parsed.warnings)


def test_a_warning_is_given_once():
    assert parse_attention("[" * 8000 + "a").warnings == ["unclosed '[' applies to the end of the prompt"]


def test_weighted_token_is_scaled_and_others_unchanged(loaded_models):
    pipe = loaded_models["sd15"].pipe
    enc = PromptEncoder(pipe)
    plain = enc.embeds(parse_attention("a red circle"))[0]  # (77, D)
    weighted = enc.embeds(parse_attention("a (red:1.5) circle"))[0]
    empty = enc._chunk([])[0]
    red = 2  # <bos> a red circle <eos>
    expected = empty[red] + 1.5 * (plain[red] - empty[red])
    assert torch.allclose(weighted[red], expected, atol=1e-5)
    others = [i for i in range(77) if i != red]
    assert torch.equal(weighted[others], plain[others])
    lowered = enc.embeds(parse_attention("a [red] circle"))[0]
    assert torch.allclose(lowered[red], empty[red] + (plain[red] - empty[red]) / 1.1, atol=1e-5)
    assert torch.equal(lowered[others], plain[others])


def _long_prompt(n_words: int, last: str = "red") -> str:
    words = ["circle", "square", "blue", "green", "star"]
    return ", ".join(words[i % len(words)] for i in range(n_words - 1)) + f", {last}"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_long_prompt_reaches_unet_in_full(loaded_models, kind):
    m = loaded_models[kind]
    prompt = _long_prompt(75)  # 75 words + 74 commas ≈ 150 tokens
    n_tokens = len(m.pipe.tokenizer(prompt).input_ids) - 2
    assert n_tokens >= 148
    seen = []
    hook = m.pipe.unet.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["encoder_hidden_states"].shape),
                                                 with_kwargs=True)
    try:
        a = generate(m, GenerationParams(prompt=prompt, steps=2, seed=1))
        b = generate(m, GenerationParams(prompt=_long_prompt(75, last="yellow"), steps=2, seed=1))
    finally:
        hook.remove()
    assert seen[0][1] == 77 * 2  # two chunks, nothing truncated
    # The last word sits in the second chunk; if it were cut off the two images would be identical.
    assert np.abs(np.asarray(a.images[0], int) - np.asarray(b.images[0], int)).max() > 0


def test_plain_prompt_is_bit_identical_to_stock_diffusers(loaded_models):
    from sd_demo.sampling.registry import make_scheduler

    m = loaded_models["sd15"]
    ours = generate(m, GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=3, seed=5,
                                        sampler="Euler")).images[0]
    m.pipe.scheduler = make_scheduler("Euler", "Automatic", m.base_scheduler_config)
    stock = m.pipe("a red circle", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0,
                   generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(stock))
    # Weights of exactly 1 are a plain prompt too.
    same = generate(m, GenerationParams(prompt="a (red:1.0) circle", negative_prompt="blurry", steps=3, seed=5,
                                        sampler="Euler")).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(same))


@pytest.mark.parametrize("kind", ["sd15", "sd2v", "sdxl"])
def test_weights_change_the_image_positive_and_negative(loaded_models, kind):
    m = loaded_models[kind]

    def img(prompt, negative=""):
        r = generate(m, GenerationParams(prompt=prompt, negative_prompt=negative, steps=2, seed=3))
        return np.asarray(r.images[0], int)

    base = img("a red circle", "blurry")
    assert np.abs(img("a (red:1.6) circle", "blurry") - base).max() > 0
    assert np.abs(img("a red circle", "(blurry:1.6)") - base).max() > 0


def test_warnings_reach_the_result(loaded_models):
    r = generate(loaded_models["sd15"], GenerationParams(prompt="(red:abc) circle", negative_prompt="(ugly", steps=1))
    assert any("prompt: weight 'abc'" in w for w in r.warnings)
    assert any("negative prompt: unclosed '('" in w for w in r.warnings)
