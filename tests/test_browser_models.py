"""The Models tab in headless Chromium, as a person uses it, against the local Hub (tests/fake_hub.py) through the
real huggingface_hub client: search (rows sorted by downloads), click a row, Download, the model listed on this
machine and offered by the Generate tab; a LoRA repo downloaded into the Generate tab's LoRA box; the model deleted
again. A download shows its progress while it runs. A public app shows neither Download nor the cache. Screenshots of
each stage go to the test's tmp folder. The app is built inside each test, after the local Hub is up: the tab
decides at build time whether the Hub is offline."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import _free_port, running_app
from tests.test_browser import CHROMIUM, browser  # noqa: F401 (browser: the module's Chromium, a fixture)
from tests.tiny_models import build_tiny_lora

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
WAIT = 60_000  # ms
HELD = "unet/diffusion_pytorch_model.safetensors"  # the file the local Hub holds back while a download is watched


@pytest.fixture
def hub_models(fake_hub, tiny_model_dirs):
    fake_hub.add("acme/tiny-sd", tiny_model_dirs["sd15"], downloads=10, likes=50)
    fake_hub.add("acme/popular-sd", tiny_model_dirs["sd15"], downloads=1000, likes=5)
    return fake_hub


@pytest.fixture
def page_of(browser, tiny_model_dirs, tmp_path):
    """page_of(): a page of the app (private, on the tiny SD 1.x model), open on the Models tab."""
    with browser.new_context(viewport={"width": 1400, "height": 1100}) as context:
        with running_app(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path / "out")]) as (url, _):
            def open_page():
                page = context.new_page()
                page.goto(url)
                page.get_by_label("Prompt", exact=True).wait_for()
                page.get_by_role("tab", name="Models").click()
                return page

            yield open_page


def _shot(page, path: Path):
    page.screenshot(path=str(path), full_page=True)


def _has_text(page, selector: str, text: str, present: bool = True):
    page.wait_for_function(f"() => (document.querySelector({json.dumps(selector)})?.innerText || '')"
                           f".includes({json.dumps(text)}) === {json.dumps(present)}", timeout=WAIT)


def _first_column(page, selector: str) -> list[str]:
    """The first cell of each body row of a gr.Dataframe (drawn as role=gridcell divs, not td)."""
    return [c.strip() for c in page.locator(f"{selector} [role=gridcell][data-col='0']").all_inner_texts()]


def _click_row(page, selector: str, repo_id: str):
    page.locator(f"{selector} [role=gridcell]", has_text=repo_id).first.click()


def _value_is(page, selector: str, value: str):
    page.wait_for_function(f"() => document.querySelector({json.dumps(selector)}).value === {json.dumps(value)}",
                           timeout=WAIT)


def _model_choices(page) -> list[str]:
    """What the Generate tab's model dropdown offers (opened and closed again)."""
    page.get_by_role("tab", name="Generate").click()
    page.get_by_label("Model", exact=True).click()
    choices = [c.strip() for c in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Models").click()
    return choices


def test_search_download_use_and_delete(hub_models, page_of, tiny_model_dirs, tmp_path):
    build_tiny_lora(tiny_model_dirs["sd15"], tmp_path / "lora")
    hub_models.add("me/red-lora", tmp_path / "lora", tags=("lora",), downloads=3)
    page = page_of()
    assert "acme/tiny-sd" not in _model_choices(page)
    page.locator("#cache-table [role=gridcell][data-col='0']").first.wait_for()  # drawn after the page's load
    assert _first_column(page, "#cache-table") == ["embedded"]  # the shipped model; the HF cache is empty

    page.locator("#hub-query textarea").fill("sd")
    page.get_by_role("button", name="Search", exact=True).click()
    _has_text(page, "#hub-results", "acme/tiny-sd")
    assert _first_column(page, "#hub-results") == ["acme/popular-sd", "acme/tiny-sd"]  # most downloads first
    assert "2 repo(s); click one to download it" in page.locator("body").inner_text()
    _shot(page, tmp_path / "1-search.png")

    _click_row(page, "#hub-results", "acme/tiny-sd")
    _value_is(page, "#download-repo textarea", "acme/tiny-sd")
    page.locator("#download-button").click()
    _has_text(page, "#download-note", "Downloaded acme/tiny-sd: pick it in the Generate tab's model list.")
    _has_text(page, "#cache-table", "acme/tiny-sd")
    assert "pipeline" in page.locator("#cache-table .virtual-row", has_text="acme/tiny-sd").inner_text()
    _shot(page, tmp_path / "2-downloaded.png")
    assert "acme/tiny-sd" in _model_choices(page)

    page.locator("#download-repo textarea").fill("me/red-lora")
    page.get_by_label("It is").click()
    page.get_by_role("option", name="LoRAs and embeddings").click()
    page.locator("#download-button").click()
    _has_text(page, "#download-note", "Downloaded me/red-lora: added to the Generate tab's LoRA list.")
    _has_text(page, "#cache-table", "me/red-lora")
    assert "LoRA" in page.locator("#cache-table .virtual-row", has_text="me/red-lora").inner_text()
    _shot(page, tmp_path / "3-lora.png")
    page.get_by_role("tab", name="Generate").click()
    lora, scale = page.locator("#lora textarea").input_value().rsplit(":", 1)
    assert lora.endswith(".safetensors") and scale == "1"
    assert Path(lora).is_file() and Path(lora).is_relative_to(tmp_path / "hf_cache")  # the downloaded copy
    _shot(page, tmp_path / "4-generate-tab.png")

    page.get_by_role("tab", name="Models").click()
    _click_row(page, "#cache-table", "acme/tiny-sd")
    _value_is(page, "#delete-repo textarea", "acme/tiny-sd")
    page.locator("#use-cached").click()  # a cached model into the Generate tab's model box
    page.wait_for_function("() => document.body.innerText.includes(\"is in the Generate tab's model box\")",
                           timeout=WAIT)
    assert page.get_by_label("Model", exact=True).input_value() == "acme/tiny-sd"
    page.locator("#delete-button").click()
    page.wait_for_function("() => document.body.innerText.includes('Deleted acme/tiny-sd: ')", timeout=WAIT)
    _has_text(page, "#cache-table", "acme/tiny-sd", present=False)
    assert _first_column(page, "#cache-table") == ["embedded", "me/red-lora"]
    _shot(page, tmp_path / "5-deleted.png")
    assert "acme/tiny-sd" not in _model_choices(page)

    # a failed delete says why on its note; the table keeps its rows (no "Error" over it)
    page.locator("#delete-repo textarea").fill("not a repo!!")
    page.locator("#delete-button").click()
    _has_text(page, "body", "'not a repo!!' is not in the local Hugging Face cache")
    assert _first_column(page, "#cache-table") == ["embedded", "me/red-lora"]
    assert "Error" not in page.locator("#cache-table").inner_text()


def test_a_download_shows_its_progress(hub_models, page_of, monkeypatch, tmp_path):
    """The local Hub holds the UNet's weights back (8 s at most, under the client's 10 s timeout) until the
    page has shown the bytes so far."""
    held = threading.Event()
    handler = hub_models._server.RequestHandlerClass
    serve = handler._file

    def held_file(self, repo_id, rev, name):
        if self.command == "GET" and name == HELD:
            held.wait(8)
        return serve(self, repo_id, rev, name)

    monkeypatch.setattr(handler, "_file", held_file)
    page = page_of()
    try:
        page.locator("#download-repo textarea").fill("acme/tiny-sd")
        page.locator("#download-button").click()
        deadline = time.monotonic() + 30
        while not hub_models.downloads(HELD) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hub_models.downloads(HELD), "the download never asked for the UNet"
        try:
            page.wait_for_function(r"() => /[\d.]+ [kM]B of [\d.]+ [kM]B/.test(document.body.innerText)",
                                   timeout=5000)
            shown = True
        except PlaywrightTimeout:
            shown = False
        _shot(page, tmp_path / "downloading.png")
    finally:
        held.set()
    _has_text(page, "#download-note", "Downloaded acme/tiny-sd")  # and it finishes once the UNet comes
    assert shown, "no progress on the page while the download ran"


def test_a_public_app_offers_no_download_or_delete(browser, fake_hub, tiny_model_dirs, tmp_path):
    """--share without --auth is public; served here on loopback only (no share link is opened). It searches, but
    shows neither Download nor the owner's cache (private or gated repos may be in it)."""
    import app

    args = app.parse_args(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path), "--share"])
    demo = app.build_demo(args)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_role("tab", name="Models").click()
        page.locator("#hub-query").wait_for()  # the Hub is online: search is offered
        assert "This app is public: search only" in page.locator("body").inner_text()
        for elem in ("#download-repo", "#download-button", "#cache-table", "#delete-repo", "#delete-button"):
            assert not page.locator(elem).is_visible()
        _shot(page, tmp_path / "public.png")
        page.close()
    finally:
        demo.close()


def test_png_info_offers_the_model_and_lora_an_image_names(hub_models, page_of, tiny_model_dirs, tmp_path):
    """An image made with a Hub model and a Hub LoRA that are not here: Send to Generate says so and offers them;
    one click downloads both, puts the model in the Generate tab's model box and the LoRA, at the image's strength,
    in its LoRA list."""
    from PIL import Image

    from sd_demo.infotext import Infotext, write_png

    build_tiny_lora(tiny_model_dirs["sd15"], tmp_path / "lora")
    hub_models.add("me/red-lora", tmp_path / "lora", tags=("lora",))
    png = tmp_path / "theirs.png"
    write_png(Image.new("RGB", (64, 64)), png, Infotext("a red circle", "", {
        "Steps": 3, "Seed": 5, "Model": "acme/tiny-sd", "Lora": "me/red-lora:0.7"}))
    page = page_of()
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("input[type=file]").last.set_input_files(str(png))
    page.wait_for_function("() => document.querySelector('#png-info-text textarea').value.includes('Seed: 5')")
    page.get_by_role("button", name="Send to Generate").click()
    page.locator("#png-info-fetch").wait_for(timeout=WAIT)
    assert page.locator("#png-info-fetch").inner_text().strip() == "Download acme/tiny-sd, me/red-lora"
    _shot(page, tmp_path / "png-info-offer.png")
    page.locator("#png-info-fetch").click()
    page.wait_for_function("() => [...document.querySelectorAll('input')].some(i => i.value === 'acme/tiny-sd')",
                           timeout=WAIT)
    assert page.get_by_label("Model", exact=True).input_value() == "acme/tiny-sd"
    assert hub_models.downloads(HELD)
    lora, scale = page.locator("#lora textarea").input_value().rsplit(":", 1)
    assert scale == "0.7" and Path(lora).is_file() and Path(lora).is_relative_to(tmp_path / "hf_cache")
