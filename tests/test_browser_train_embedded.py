"""The Training tab's promise on the model in hand: a new user uploads 12 images of a concept the embedded model has
never seen (a bar, captioned with a made-up word), presses Train without opening "Advanced", uses the result in
the Generate tab and gets the concept, judged by the project's pixel evaluator. Everything through the browser."""
import os

import pytest

from sd_demo import models
from tests.test_browser import CHROMIUM, FLAGS

# About 7 minutes on 2 cores (the default preset trains for ~4 of them): run with -m slow. Passed in session 10
# (4/4 images of "a green vexbar on a purple background" drew the bar, data seed 3, word and scenes unseen in tuning)
# and in session 11 with the trigger found in the captions and trained as a new token (436 s).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.skipif(not (models.EMBEDDED_DIR / "model_index.json").exists(), reason="embedded model not built"),
]
WORD = "vexbar"  # not in the embedded vocabulary
WAIT = 900_000  # ms: the default preset trains for a few minutes on 2 cores


@pytest.fixture
def embedded_app(tmp_path):
    from tests.conftest import running_app

    with running_app(["--outputs", str(tmp_path / "out")]) as served:
        yield served


def test_default_preset_teaches_the_embedded_model_a_new_shape_from_the_browser(embedded_app, tmp_path):
    from playwright.sync_api import sync_playwright

    from PIL import Image

    from sd_demo.infotext import read_png
    from sd_demo.shapes.novel import bar_scenes, shows_bar, write_dataset

    data = write_dataset(bar_scenes(12, seed=3), WORD, tmp_path / "data", "canonical")
    url, engine = embedded_app
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-files input[type=file]").set_input_files(sorted(str(p) for p in data.iterdir()))
        page.wait_for_function("() => document.querySelector('#train-data-note').innerText.includes('12 image')",
                               timeout=60_000)
        assert "embedded-lora-cpu" in page.locator("#train-preset-note").inner_text()
        page.locator("#train-btn").click()
        page.wait_for_function("() => document.querySelector('#train-status').innerText.trim()"
                               ".startsWith('finished ·')", timeout=WAIT)
        job = engine.jobs.jobs()[0]
        view = engine.jobs.view(job)
        assert view.losses and view.samples  # the loss plot and the live sample grid had data
        page.screenshot(path=str(tmp_path / "trained.png"), full_page=True)
        page.locator("#train-use").click()
        page.wait_for_function("() => document.querySelector('#lora textarea').value.includes(':1')", timeout=60_000)
        page.get_by_label("Prompt", exact=True).fill(f"a green {WORD} on a purple background")
        page.get_by_label("Seed (-1 = random)").fill("11")
        batch = page.get_by_label("number input for Batch size")
        batch.fill("4")
        batch.press("Enter")
        page.locator("#generate-btn").click()
        page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4", timeout=300_000)
        page.screenshot(path=str(tmp_path / "generated.png"), full_page=True)
        browser.close()
    pngs = sorted((tmp_path / "out" / "txt2img-images").rglob("*.png"))
    assert len(pngs) == 4 and all(read_png(p).params.get("Lora") for p in pngs)  # drawn with the result
    bars = sum(shows_bar(Image.open(p)) for p in pngs)
    assert bars >= 3, f"{bars}/4 images show the new shape"
