"""A person's path through the UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""
import os

import pytest

from sd_demo.infotext import read_png

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
# Flags for a closed network: no background calls home that would be refused and slow start-up.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, app_server):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(app_server[0])
    page.get_by_label("Prompt", exact=True).wait_for()
    return page


def test_type_prompt_generate_and_read_parameters(page, tmp_path):
    page.get_by_label("Prompt", exact=True).fill("a green square")
    page.get_by_label("Negative prompt").fill("blurry")
    steps = page.get_by_label("number input for Sampling steps")
    steps.fill("4")
    steps.press("Enter")
    page.get_by_label("Seed (-1 = random)").fill("77")
    page.locator("#generate-btn").click()
    page.locator("#gallery img").first.wait_for(timeout=60_000)
    info = page.locator("#infotext textarea")
    page.wait_for_function("() => document.querySelector('#infotext textarea').value.includes('Seed: 77')")
    text = info.input_value()
    assert text.startswith("a green square\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M")
    assert "seed 77" in page.locator("#run-status").inner_text()
    page.screenshot(path=str(tmp_path / "generate.png"))


def test_fast_ticked_runs_and_says_so(page):
    """The Fast checkbox under the sampling controls: the run takes Deep cache 3 and CFG cutoff 0.6 (Advanced left
    them off; bf16 autocast only for UNets far larger than the embedded model's), and the picture's parameters say
    what ran."""
    fast = page.locator(".fast:visible input[type=checkbox]")
    assert fast.count() == 1  # the img2img tab's own is hidden
    fast.check()
    page.get_by_label("Seed (-1 = random)").fill("78")
    page.locator("#generate-btn").click()
    page.wait_for_function("() => document.querySelector('#infotext textarea').value.includes('Seed: 78')",
                           timeout=60_000)
    text = page.locator("#infotext textarea").input_value()
    assert "Deep cache: 3" in text and "CFG cutoff: 0.6" in text
    assert "Autocast" not in text
    fast.uncheck()


def test_png_info_sends_parameters_back(page, app_server, tmp_path):
    from sd_demo.generate import GenerationParams

    engine = app_server[1]
    _, paths = engine.generate(GenerationParams(prompt="a purple star", negative_prompt="ugly", steps=3, seed=123,
                                                sampler="Euler a", guidance_scale=4.5))
    assert read_png(paths[0]).params["Seed"] == 123
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#png-info-file input[type=file]").set_input_files(str(paths[0]))
    page.wait_for_function("() => document.querySelector('#png-info-text textarea').value.includes('Seed: 123')")
    page.get_by_role("button", name="Send to Generate").click()
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.wait_for()
    page.wait_for_function("() => [...document.querySelectorAll('textarea')].some(t => t.value === 'a purple star')")
    assert prompt.input_value() == "a purple star"
    assert page.get_by_label("Negative prompt").input_value() == "ugly"
    assert page.get_by_label("Seed (-1 = random)").input_value() == "123"
    assert page.get_by_label("number input for CFG scale").input_value() == "4.5"
    assert page.get_by_label("Sampling method").input_value() == "Euler a"


def test_a_first_visitor_clicks_an_example_and_gets_it(browser, tmp_path, tiny_model_dirs):
    """On the embedded model the page offers its card's example prompts: one click fills the prompt, Generate
    draws what it asks (the project's evaluator). A model whose card lists none hides them; back on the embedded
    model they return."""
    from PIL import Image

    from sd_demo.shapes.evaluate import evaluate
    from tests.conftest import running_app

    with running_app(["--model", "embedded", "--outputs", str(tmp_path)]) as (url, engine):
        example = engine.defaults().examples[0]  # the card's first
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("#examples button", has_text=example).click()
        prompt = page.get_by_label("Prompt", exact=True)
        page.wait_for_function("t => document.querySelector('textarea').value === t", arg=example)
        assert prompt.input_value() == example
        page.get_by_label("Seed (-1 = random)").fill("11")  # (the evaluator's verdict must not depend on chance)
        page.locator("#generate-btn").click()
        page.wait_for_function("() => document.querySelector('#infotext textarea').value.includes('Seed:')",
                               timeout=60_000)
        page.screenshot(path=str(tmp_path / "example.png"))
        for model, shown in ((str(tiny_model_dirs["sd15"]), False), ("embedded", True)):
            box = page.get_by_label("Model", exact=True)
            box.fill(model)
            box.press("Enter")  # a custom value (a folder) is taken on Enter
            page.get_by_role("button", name="Load", exact=True).click()
            page.wait_for_function("m => document.querySelector('#model-status').innerText.includes(m)",
                                   arg=model.rsplit("/", 1)[-1], timeout=60_000)
            page.locator("#examples").wait_for(state="visible" if shown else "hidden")
        assert page.locator("#examples button").first.inner_text().strip() == example
        page.close()
    image = Image.open(next((tmp_path / "txt2img-images").rglob("*.png")))
    assert read_png(image.filename).prompt == example
    assert evaluate(example, image).ok, evaluate(example, image).summary()
