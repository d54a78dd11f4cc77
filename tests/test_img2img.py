"""Image to image, inpainting and hires fix (issue 20): the image work (fit, blur, crop, fill, paste back) and what a
user sees on the embedded model, judged by the project's evaluator."""
import numpy as np
import pytest
import torch
from PIL import Image

from sd_demo import img2img
from sd_demo.generate import GenerationParams, decode, encode, generate, params_from_infotext
from sd_demo.shapes.evaluate import detect
from sd_demo.shapes.vocab import Color, Position, Shape, Size
from sd_demo.shapes.world import make_scene, render


@pytest.fixture(scope="module")
def embedded():
    from sd_demo.models import load_model

    return load_model("embedded")


def scene(shape=Shape.CIRCLE, color=Color.RED, position=Position.LEFT, background=Color.BLUE) -> Image.Image:
    return render(make_scene(shape, color, background, position=position), 128)


# ---------------------------------------------------------------------------------------------- image work, no model

def test_output_size_follows_the_source_aspect_at_the_native_area():
    assert img2img.output_size((128, 128), 128, None, None) == (128, 128)
    assert img2img.output_size((800, 600), 512, None, None) == (592, 440)  # about 512^2 pixels, 4:3
    assert img2img.output_size((800, 600), 512, 640, None) == (640, 480)  # one side given: the other follows
    assert img2img.output_size((800, 600), 512, 256, 256) == (256, 256)  # both given: as asked
    assert img2img.hires_size(128, 96, 2.0, 0, 0) == (256, 192)
    assert img2img.hires_size(128, 96, 2.0, 512, 0) == (512, 384)


def test_resize_modes_fit_crop_and_fill_as_a1111(embedded):
    proc = embedded.pipe.image_processor
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 255, 0), (0, 0, 100, 100))  # left half green, right half red
    stretched = img2img.prepare(proc, wide, None, 64, 64, "Just resize", 4, "original", False, 32).image
    cropped = img2img.prepare(proc, wide, None, 64, 64, "Crop and resize", 4, "original", False, 32).image
    filled = img2img.prepare(proc, wide, None, 64, 64, "Resize and fill", 4, "original", False, 32).image
    assert stretched.size == cropped.size == filled.size == (64, 64)
    # crop keeps the middle (the halves meet in the centre); fill keeps everything and extends the edges
    assert np.asarray(cropped)[32, 2][1] > 200 and np.asarray(cropped)[32, 61][0] > 200
    top = np.asarray(filled)[2, 5]  # above the fitted picture: its top edge stretched
    assert top[1] > 200 and top[0] < 60


def test_fill_paints_the_hole_with_its_surroundings_and_nothing_else():
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (40, 20, 56, 44))  # a red square the hole will cover
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (36, 16, 60, 48))
    out = np.asarray(img2img.fill(image, mask)).astype(int)
    assert (out[:, :30] == np.asarray(image)[:, :30]).all()  # outside the mask: untouched
    assert abs(out[30, 48] - [0, 0, 255]).max() < 8  # the red is gone: the blue around it fills the hole


def test_mask_from_editor_strokes_and_empty_masks_are_refused():
    stroke = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 128), (4, 4, 10, 10))
    mask = img2img.mask_from_layers([stroke])
    assert np.asarray(mask)[6, 6] == 255 and np.asarray(mask)[20, 20] == 0
    assert img2img.mask_from_layers([Image.new("RGBA", (32, 32))]) is None  # nothing painted: image to image
    with pytest.raises(ValueError, match="mask: it marks nothing"):
        img2img.check_mask(Image.new("L", (32, 32), 0), (32, 32))


def test_bad_values_name_the_field():
    for kw, msg in [(dict(strength=1.5), "strength: 1.5 is out of range"),
                    (dict(resize_mode="stretch"), "resize_mode: unknown 'stretch'"),
                    (dict(masked_content=""), "masked_content: unknown ''"),
                    (dict(hires_scale=9), "hires_scale: 9 is out of range"),
                    (dict(hires_width=100), "hires_width: 100 px is not allowed"),
                    (dict(mask_blur=-1), "mask_blur: -1 is out of range")]:
        with pytest.raises(ValueError, match=msg):
            GenerationParams(prompt="x", **kw).validate()


def test_parameters_read_back_from_a1111_img2img_and_hires_text():
    from sd_demo.infotext import parse_infotext

    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.55, "
            "Mask blur: 8, Inpaint area: Only masked, Masked area padding: 48, Hires upscale: 1.5, Hires steps: 12, "
            "Hires upscaler: R-ESRGAN 4x+")
    params, ignored = params_from_infotext(parse_infotext(text))
    assert (params.strength, params.mask_blur, params.only_masked, params.only_masked_padding) == (0.55, 8, True, 48)
    assert (params.hires_scale, params.hires_steps) == (1.5, 12)
    assert ignored == ["Hires upscaler (R-ESRGAN 4x+)"]  # an upscaler we do not have is said, not guessed


# ------------------------------------------------------------------------------------------- the embedded model

def test_strength_zero_returns_the_picture_after_the_vae_round_trip(embedded):
    src = scene()
    r = generate(embedded, GenerationParams(prompt="a green circle", strength=0, seed=1), init_image=src)
    expected = decode(embedded, encode(embedded, [src]))[0]
    # within one level of 255: the two decodes run at different times, and oneDNN's kernels may differ in rounding
    assert np.abs(np.asarray(r.images[0]).astype(int) - np.asarray(expected)).max() <= 1
    assert r.infotexts[0].params["Denoising strength"] == 0
    assert r.infotexts[0].params["Init image size"] == "128x128"


def test_the_issues_red_circle_turns_green_where_it_was(embedded):
    """Issue 20's example: a red circle on the left, redrawn at strength 0.6 and 0.8 as "a green circle on the
    left": green, still a circle of the same size in the same place, which strength 1 (the picture ignored) does
    not keep as often (the prompt names no size: that is the picture's alone). On a white background: on the
    issue's blue one this model erases the circle (its VAE's latents pass from red to green through blue, the
    background) and draws a new one where the noise puts it; stock diffusers' img2img pipeline does the same
    (BENCHMARKS.md, benchmarks/img2img.py)."""
    src = scene(Shape.CIRCLE, Color.RED, Position.LEFT, Color.WHITE)

    def redrawn(strength: float) -> list:
        r = generate(embedded, GenerationParams(prompt="a green circle on the left on a white background",
                                                strength=strength, seed=100, batch_size=4), init_image=src)
        return [detect(im) for im in r.images]

    found, ignored = redrawn(0.6) + redrawn(0.8), redrawn(1.0)
    assert sum(d.color == Color.GREEN for d in found) >= 6, [d.color for d in found]  # of 8 (measured 8)
    assert sum(d.shape == Shape.CIRCLE for d in found) >= 6, [d.shape for d in found]  # (8)
    laid_out = [sum(d.position == Position.LEFT and d.size == Size.LARGE for d in ds) for ds in (found, ignored)]
    # of 8 and of 4: the picture keeps the place and size more often than the prompt alone (measured 7 and 2)
    assert laid_out[0] >= 6 and laid_out[0] / 8 > laid_out[1] / 4, laid_out


def test_img2img_recolours_and_keeps_the_layout_that_strength_one_forgets(embedded):
    """A new colour in the prompt, the position left to the picture: at strength 0.5 the colour follows the
    prompt and the object stays where it was, which strength 1 (the picture ignored) forgets."""
    cases = [(Shape.STAR, Color.WHITE, Position.RIGHT, "orange"),
             (Shape.SQUARE, Color.YELLOW, Position.TOP_LEFT, "purple")]
    colour, kept, kept_at_one = 0, 0, 0
    for shape, old, where, new in cases:
        src = scene(shape, old, where)
        prompt = f"a {new} {shape.value} on a blue background"
        for strength in (0.5, 1.0):
            r = generate(embedded, GenerationParams(prompt=prompt, strength=strength, seed=100, batch_size=4),
                         init_image=src)
            found = [detect(im) for im in r.images]
            if strength == 1.0:
                kept_at_one += sum(d.position == where for d in found)
                continue
            colour += sum(d.color is not None and d.color.value == new for d in found)
            kept += sum(d.position == where for d in found)
    assert colour >= 6, colour  # of 8 (benchmarks/img2img.py, 8 seeds: 16 of 16)
    assert kept >= 6 and kept >= kept_at_one + 3, (kept, kept_at_one)  # (16 of 16 against 3 of 16)


def test_inpainting_draws_inside_the_mask_and_keeps_every_pixel_outside(embedded):
    src = scene(Shape.CIRCLE, Color.RED, Position.LEFT)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (86, 0, 128, 128))  # the right third
    yellow = 0
    for content in ("original", "fill", "latent noise"):
        r = generate(embedded, GenerationParams(prompt="a yellow square on the right on a blue background",
                                                strength=0.9, seed=3, batch_size=2, masked_content=content),
                     init_image=src, mask=mask)
        for im in r.images:
            out = np.asarray(im).astype(int)
            assert (out[:, :76] == np.asarray(src)[:, :76]).all()  # outside the mask and its blur: the source's
            # the masked strip alone on the background: is there a yellow object in it?
            strip = Image.new("RGB", (128, 128), Color.BLUE.rgb)
            strip.paste(im.crop((86, 0, 128, 128)), (86, 0))
            d = detect(strip)
            assert d.found and d.measure.area > 0.01  # an object, at least a third of the small size
            yellow += d.color == Color.YELLOW
        assert r.infotexts[0].params["Masked content"] == content
    assert yellow >= 3, yellow  # of 6 (the others orange-yellow: the model's small squares run warm)


def test_only_masked_redraws_the_box_at_full_size_and_pastes_it_back(embedded):
    big = render(make_scene(Shape.CIRCLE, Color.RED, Color.BLUE, position=Position.LEFT), 256)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (170, 100, 230, 160))
    r = generate(embedded, GenerationParams(prompt="a yellow square on a blue background", strength=1.0, seed=2,
                                            only_masked=True, only_masked_padding=16, width=128, height=128),
                 init_image=big, mask=mask)
    out = r.images[0]
    assert out.size == (256, 256)  # the source's size: the box was redrawn at 128 px and pasted back
    assert (np.asarray(out)[:, :140] == np.asarray(big)[:, :140]).all()
    assert r.infotexts[0].params["Inpaint area"] == "Only masked"


def test_hires_fix_doubles_the_size_and_keeps_the_prompt(embedded):
    """The embedded model knows only 128 px, so its second pass is redrawn lightly over a Lanczos enlargement
    (strength 0.3): 12 held-out prompts kept shape 83 % / colour 75 % against 92 / 83 % at 128 px, where the
    latent upscalers at 0.55-0.7 fell to 50-67 % shape."""
    from sd_demo.shapes.eval_model import heldout_prompts
    from sd_demo.shapes.evaluate import evaluate_set

    prompts = heldout_prompts(6, seed=3)
    small, large = [], []
    steps = []
    for i, prompt in enumerate(prompts):
        small.append(generate(embedded, GenerationParams(prompt=prompt, seed=i, steps=12)).images[0])
        r = generate(embedded, GenerationParams(prompt=prompt, seed=i, steps=12, hires_scale=2, hires_steps=4,
                                                strength=0.3, hires_upscaler="Lanczos"),
                     on_step=lambda ev: steps.append((ev.step, ev.total)))
        assert r.images[0].size == (256, 256)
        large.append(r.images[0].resize((128, 128), Image.Resampling.BOX))
    base, hires = evaluate_set(prompts, small), evaluate_set(prompts, large)
    for attr in ("shape", "color", "background"):
        assert hires.accuracy(attr) >= base.accuracy(attr) - 1 / 6, attr  # at most one prompt of six lost
    assert steps[-1] == (16, 16)  # one progress bar over both passes: 12 + the 4 hires steps, all of them run
    info = r.infotexts[0].params
    assert (info["Size"], info["Hires upscale"], info["Hires steps"], info["Denoising strength"]) == \
        ("128x128", 2.0, 4, 0.3)


def test_stop_during_img2img_returns_what_was_reached(embedded):
    import threading

    cancel = threading.Event()

    def on_step(ev):
        if ev.step == 3:
            cancel.set()

    r = generate(embedded, GenerationParams(prompt="a green circle", strength=0.8, seed=1), init_image=scene(),
                 on_step=on_step, cancel=cancel)
    assert r.interrupted_at == 3 and len(r.images) == 1


# ------------------------------------------------------------------------------ other architectures (tiny, random)

@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_img2img_inpaint_and_hires_run_on_sd_and_sdxl(tiny_model_dirs, kind):
    from sd_demo.models import load_model

    m = load_model(str(tiny_model_dirs[kind]))
    src = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (32, 0, 64, 48))
    p = GenerationParams(prompt="a red square", steps=4, seed=1)
    assert generate(m, p, init_image=src).images[0].size == (72, 56)  # 4:3, about the model's 64x64 pixels
    out = generate(m, GenerationParams(prompt="a red square", steps=4, seed=1, width=64, height=48), init_image=src,
                   mask=mask).images[0]
    assert (np.asarray(out)[:, :20] == np.asarray(src)[:, :20]).all()
    hires = generate(m, GenerationParams(prompt="a red square", steps=2, seed=1, width=64, height=64,
                                         hires_scale=1.5))
    assert hires.images[0].size == (96, 96)
    assert m.variants["img2img"].unet is m.pipe.unet  # the same modules: no second copy of the model


def test_an_inpainting_checkpoint_runs_its_nine_channel_pipeline(tiny_model_dirs):
    from sd_demo.models import load_model
    from tests.tiny_models import _unet

    m = load_model(str(tiny_model_dirs["sd15"]))
    m.pipe.register_modules(unet=_unet(in_channels=9))  # what an SD inpainting checkpoint's UNet takes
    src = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 40, 64, 64))
    out = generate(m, GenerationParams(prompt="a red square", steps=3, seed=1), init_image=src, mask=mask)
    assert (np.asarray(out.images[0])[:28] == np.asarray(src)[:28]).all()
    with pytest.raises(ValueError, match="mask: this is an inpainting checkpoint; give a mask"):
        generate(m, GenerationParams(prompt="x", steps=2), init_image=src)
    with pytest.raises(ValueError, match="masked_content: 'latent noise' needs an ordinary checkpoint"):
        generate(m, GenerationParams(prompt="x", steps=2, masked_content="latent noise"), init_image=src, mask=mask)
    # txt2img on it, as A1111 conditions it: everything masked over a blank picture, from pure noise; the same
    # pixels as diffusers' inpaint pipeline given that
    from diffusers import StableDiffusionInpaintPipeline

    from sd_demo.generate import make_generators

    txt = generate(m, GenerationParams(prompt="a red square", steps=3, seed=4, batch_size=2, width=64, height=64))
    assert len(txt.images) == 2 and txt.images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(txt.images[0]), np.asarray(txt.images[1]))
    stock = StableDiffusionInpaintPipeline.from_pipe(m.pipe)(
        "a red square", image=Image.new("RGB", (64, 64), (127, 127, 127)), mask_image=Image.new("L", (64, 64), 255),
        strength=1.0, num_inference_steps=3, guidance_scale=txt.infotexts[0].params["CFG scale"], width=64,
        height=64, generator=make_generators(4, 1)).images[0]
    assert np.abs(np.asarray(stock, dtype=int) - np.asarray(txt.images[0])).max() <= 1
    hires = generate(m, GenerationParams(prompt="a red square", steps=2, seed=4, batch_size=2, width=64, height=64,
                                         hires_scale=1.5))
    assert [im.size for im in hires.images] == [(96, 96)] * 2


def test_noise_draws_equal_the_pipeline_start_noise():
    from diffusers.utils.torch_utils import randn_tensor

    from sd_demo.generate import make_generators, noise_draws

    first, second = noise_draws(7, (2, 4, 8, 8), 2)
    assert torch.equal(first, randn_tensor((2, 4, 8, 8), generator=make_generators(7, 2)))
    assert not torch.equal(first, second)
