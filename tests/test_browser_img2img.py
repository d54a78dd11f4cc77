"""img2img in headless Chromium (Debian's /usr/bin/chromium, Playwright): generate, send the image to img2img, paint
over its right side with the brush, inpaint; the saved PNG keeps every pixel the stroke did not touch."""
import os

import numpy as np
import pytest
from PIL import Image

from sd_demo.infotext import read_png
from tests.test_browser import CHROMIUM, FLAGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]


def test_paint_a_mask_and_inpaint(tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.conftest import running_app

    with running_app(["--model", "embedded", "--outputs", str(tmp_path)]) as (url, engine), \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_label("Prompt", exact=True).fill("a red circle on the left on a blue background")
        page.get_by_label("Seed (-1 = random)").fill("5")
        page.locator("#generate-btn").click()
        page.wait_for_function("() => document.querySelector('#infotext textarea').value.includes('Seed: 5')",
                               timeout=60_000)
        page.locator("#send-img2img").click()
        prompt = page.locator("#img2img-prompt textarea")
        page.wait_for_function("() => document.querySelector('#img2img-prompt textarea')?.value.includes('red')")
        prompt.fill("a yellow square on the right on a blue background")
        page.locator("#img2img-strength input[type=number]").fill("0.9")
        # the brush (the editor's default tool once a picture is in: white, wide): two strokes down the picture's
        # right side (it sits centred in the canvas at the zoom the editor shows)
        box = page.locator("#img2img-image canvas").first.bounding_box()
        zoom = float(page.locator("#img2img-image").get_by_text("%").first.inner_text().strip("% "))
        side = 128 * zoom / 100
        x0, y0 = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
        for fx in (0.7, 0.85):
            page.mouse.move(x0 + fx * side, y0 + 0.1 * side)
            page.wait_for_timeout(100)
            page.mouse.down()
            for fy in np.linspace(0.1, 0.9, 20):  # paced like a hand: the editor samples the pointer per frame
                page.mouse.move(x0 + fx * side, y0 + fy * side)
                page.wait_for_timeout(30)
            page.mouse.up()
        page.screenshot(path=str(tmp_path / "1-painted.png"))
        page.locator("#img2img-btn").click()
        page.wait_for_function("() => document.querySelector('#img2img-infotext textarea')?.value.includes('Mask "
                               "blur')", timeout=120_000)
        page.screenshot(path=str(tmp_path / "2-inpainted.png"))
        browser.close()
    source = Image.open(next((tmp_path / "txt2img-images").rglob("*.png"))).convert("RGB")
    path = next((tmp_path / "img2img-images").rglob("*.png"))
    result = Image.open(path).convert("RGB")
    assert read_png(path).params["Denoising strength"] == 0.9
    # Where headless Chromium's strokes land is the editor's business (nearer the centre than the pointer, here);
    # what counts: the strokes became the mask. Outside it every pixel is the source's (img2img without a mask
    # keeps none: tests/test_img2img.py), inside it something new was drawn.
    same = (np.asarray(result) == np.asarray(source)).all(axis=2)
    assert 0.3 < same.mean() < 0.98, same.mean()
    assert same[:, :16].all()  # the picture's left edge: no stroke came near it
    changed = np.abs(np.asarray(result).astype(int) - np.asarray(source)).max(axis=2) > 60
    assert changed.sum() > 50  # a new object, not just a re-rendered background
