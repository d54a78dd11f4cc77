"""The queue and the history in headless Chromium (Debian's /usr/bin/chromium, Playwright), as a visitor uses them:
a long job started with Generate, two more queued with the Queue button while it runs, the last cancelled from the
queue panel before it starts, the other two found in the History tab, which still holds them after a page reload;
one sent to img2img. Screenshots go to the test's folder."""
import os

import pytest

from tests.test_browser import CHROMIUM, FLAGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]

WAIT = 120_000
ROWS = "#queue-table .virtual-row"  # a gr.Dataframe's body rows (divs of role=gridcell, not td)
COUNT = f"[...document.querySelectorAll('{ROWS}')].filter(r => r.innerText.trim()).length"


def _rows(page) -> list[str]:
    """The queue panel's rows as text (its prompt column last)."""
    return [r for r in page.locator(ROWS).all_inner_texts() if r.strip()]


def test_queue_cancel_and_a_history_that_survives_a_reload(tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.conftest import running_app

    prompts = ["a red circle on a blue background", "a white star on a green background",
               "a yellow square on a black background"]
    with running_app(["--model", "embedded", "--outputs", str(tmp_path)]) as (url, engine), \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        for n, prompt in enumerate(prompts):
            page.get_by_label("Prompt", exact=True).fill(prompt)
            # the first is long enough that the others are still waiting when the last is cancelled
            page.get_by_label("number input for Sampling steps").fill("150" if n == 0 else "20")
            page.get_by_label("Seed (-1 = random)").fill(str(10 + n))
            page.locator("#generate-btn" if n == 0 else "#queue-btn").click()  # Generate streams; Queue returns
            page.wait_for_function(f"() => {COUNT} >= {n + 1}", timeout=WAIT)
        page.screenshot(path=str(tmp_path / "1-queued.png"))
        rows = _rows(page)
        assert "now" in rows[0] and "running" in rows[0] and prompts[0] in rows[0]
        assert "1 ahead" in rows[1] and "2 ahead" in rows[2] and prompts[2] in rows[2]
        page.locator(ROWS).nth(2).locator("[role=gridcell]").last.click()  # pick the last job
        page.locator("#queue-cancel").click()
        page.wait_for_function(f"() => {COUNT} == 2")
        assert not any(prompts[2] in r for r in _rows(page))
        page.screenshot(path=str(tmp_path / "2-cancelled.png"))
        engine.cancel_queued(engine.queued(None)[0][0].id, None)  # (the long first job: stop it, as Stop would)
        page.wait_for_function(f"() => {COUNT} == 0", timeout=WAIT)
        page.reload()
        page.get_by_role("tab", name="History").click()
        items = page.locator("#history-gallery .thumbnail-item")
        page.wait_for_function("() => document.querySelectorAll('#history-gallery .thumbnail-item').length == 2",
                               timeout=WAIT)
        captions = " ".join(items.all_inner_texts())
        assert prompts[0][:40] in captions and prompts[1][:40] in captions and prompts[2][:40] not in captions
        page.screenshot(path=str(tmp_path / "3-history-after-reload.png"))
        items.first.click()  # the newest: the second job
        page.wait_for_function(f"() => document.querySelector('#history-info textarea').value.startsWith("
                               f"'{prompts[1]}')")
        page.locator("#history-img2img").click()
        page.wait_for_function(f"() => document.querySelector('#img2img-prompt textarea')?.value == '{prompts[1]}'")
        page.locator("#img2img-btn").click()  # the picture came with it: img2img runs on it
        page.wait_for_function("() => document.querySelector('#img2img-infotext textarea')?.value.includes("
                               "'Init image size: 128x128')", timeout=WAIT)
        page.screenshot(path=str(tmp_path / "4-sent-to-img2img.png"))
        browser.close()
    history = engine.history(None)  # newest first: the img2img run, then the two jobs (the first one stopped)
    assert [e.label for e in history] == [prompts[1], *prompts[1::-1]]
    assert [e.kind for e in history] == ["img2img", "txt2img", "txt2img"]
    assert [e.state for e in history] == ["done", "done", "stopped"]
