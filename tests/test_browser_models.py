"""The Models tab in headless Chromium, as a person uses it, against the local Hub (tests/fake_hub.py) through the
real huggingface_hub client: search (rows sorted by downloads), click a row, Download with its progress showing,
the model listed on this machine and offered by the Generate tab; a LoRA repo downloaded into the Generate tab's
LoRA box; the model deleted again. A public app shows neither Download nor Delete. Screenshots of each stage go to
the test's tmp folder."""
import json
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import _free_port, running_app
from tests.test_browser import CHROMIUM, FLAGS
from tests.test_models_tab import _lora

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
WAIT = 60_000  # ms
HELD = "unet/diffusion_pytorch_model.safetensors"  # the file the local Hub holds back until the progress was seen


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def gate(fake_hub, monkeypatch):
    """An Event: until it is set, the local Hub holds every GET of HELD (30 s at most), so a download stays part
    way long enough to see its progress."""
    opened = threading.Event()
    handler = fake_hub._server.RequestHandlerClass
    serve = handler._file

    def held_file(self, repo_id, rev, name):
        if self.command == "GET" and name == HELD:
            opened.wait(6)
        return serve(self, repo_id, rev, name)

    monkeypatch.setattr(handler, "_file", held_file)
    yield opened
    opened.set()  # a failed test must not leave a server thread waiting


def _has_text(page, selector: str, text: str):
    page.wait_for_function(f"() => (document.querySelector({json.dumps(selector)})?.innerText || '')"
                           f".includes({json.dumps(text)})", timeout=WAIT)


def _rows(page, selector: str) -> list[str]:
    """The first cell of each body row of a gr.Dataframe (drawn as role=gridcell divs, not td)."""
    return [c.strip() for c in page.locator(f"{selector} [role=gridcell][data-col='0']").all_inner_texts()]


def _model_choices(page) -> list[str]:
    page.get_by_label("Model", exact=True).click()
    choices = [c.strip() for c in page.get_by_role("option").all_inner_texts()]
    page.keyboard.press("Escape")
    return choices


def test_search_download_use_and_delete(browser, fake_hub, gate, tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["sd15"]
    fake_hub.add("acme/tiny-sd", source, downloads=10, likes=50)
    fake_hub.add("acme/popular-sd", source, downloads=1000, likes=5)
    _lora(source, tmp_path / "lora")
    fake_hub.add("me/red-lora", tmp_path / "lora", tags=("lora",), downloads=3)
    shot = lambda page, name: page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)  # noqa: E731

    # built after the fake Hub is up: the tab decides at build time whether the Hub is offline
    with running_app(["--model", str(source), "--outputs", str(tmp_path / "out")]) as (url, _):
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_label("Prompt", exact=True).wait_for()
        assert "acme/tiny-sd" not in _model_choices(page)
        page.get_by_role("tab", name="Models").click()
        page.locator("#hub-query textarea").fill("sd")
        page.get_by_role("button", name="Search", exact=True).click()
        _has_text(page, "#hub-results", "acme/tiny-sd")
        assert _rows(page, "#hub-results") == ["acme/popular-sd", "acme/tiny-sd"]  # most downloads first
        assert "2 repo(s); click one to download it" in page.locator("body").inner_text()
        shot(page, "1-search")

        page.locator("#hub-results [role=gridcell]", has_text="acme/tiny-sd").first.click()
        page.wait_for_function("() => document.querySelector('#download-repo textarea').value === 'acme/tiny-sd'",
                               timeout=WAIT)
        page.locator("#download-button").click()
        page.wait_for_timeout(3000); shot(page, "dbg"); print("BODY", page.locator("body").inner_text()); print("HTML", page.locator("#download-note").evaluate("e => e.parentElement.parentElement.outerHTML"))
        shot(page, "2-downloading")
        gate.set()
        _has_text(page, "#download-note", "Downloaded acme/tiny-sd")
        _has_text(page, "#cache-table", "acme/tiny-sd")
        assert "pipeline" in page.locator("#cache-table .virtual-row", has_text="acme/tiny-sd").inner_text()
        shot(page, "3-downloaded")

        page.get_by_label("Repo id (org/name, or org/name@revision)").fill("me/red-lora")
        page.get_by_label("It is").click()
        page.get_by_role("option", name="LoRAs and embeddings").click()
        page.locator("#download-button").click()
        _has_text(page, "#download-note", "Downloaded me/red-lora")
        _has_text(page, "#cache-table", "me/red-lora")
        assert "LoRA" in page.locator("#cache-table .virtual-row", has_text="me/red-lora").inner_text()
        shot(page, "4-lora")

        page.get_by_role("tab", name="Generate").click()
        assert "acme/tiny-sd" in _model_choices(page)
        lora, scale = page.locator("#lora textarea").input_value().rsplit(":", 1)
        assert lora.endswith(".safetensors") and Path(lora).is_file() and scale == "1"
        assert str(tmp_path / "hf_cache") in lora  # the downloaded copy, not the folder the Hub served
        shot(page, "5-generate-tab")

        page.get_by_role("tab", name="Models").click()
        page.locator("#cache-table [role=gridcell]", has_text="acme/tiny-sd").first.click()
        page.wait_for_function("() => document.querySelector('#delete-repo textarea').value === 'acme/tiny-sd'",
                               timeout=WAIT)
        page.locator("#delete-button").click()
        page.wait_for_function("() => document.body.innerText.includes('Deleted acme/tiny-sd')", timeout=WAIT)
        page.wait_for_function("() => !document.querySelector('#cache-table').innerText.includes('acme/tiny-sd')",
                               timeout=WAIT)
        assert "me/red-lora" in _rows(page, "#cache-table")
        shot(page, "6-deleted")
        page.get_by_role("tab", name="Generate").click()
        assert "acme/tiny-sd" not in _model_choices(page)
        page.close()


def test_a_public_app_offers_no_download_or_delete(browser, fake_hub, tiny_model_dirs, tmp_path):
    """--share without --auth is public; served here on loopback only (no share link is opened)."""
    import app

    args = app.parse_args(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path), "--share"])
    demo = app.build_demo(args)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.get_by_role("tab", name="Models").click()
        page.locator("#hub-query").wait_for()  # the Hub is online: search is there
        assert "This app is public: downloads and deleting are off" in page.locator("body").inner_text()
        for elem in ("#download-repo", "#download-button", "#delete-repo", "#delete-button"):
            assert not page.locator(elem).is_visible()
        page.screenshot(path=str(tmp_path / "public.png"), full_page=True)
        page.close()
    finally:
        demo.close()
