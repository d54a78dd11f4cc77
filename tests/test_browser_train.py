"""The Training tab in headless Chromium, as a person uses it (tiny SD 1.x model, so steps take milliseconds):
upload (a bad file is listed as skipped, the found trigger named), auto-caption, Train, the live status and loss
plot, a page reload re-attaches (job and data), Stop, Resume, a kill from outside shows "interrupted" and Resume
continues, "Train N more steps", "Use in Generate",
generate with the result, download the zip. Screenshots of each stage go to the test's tmp folder."""
import json
import os
import signal

import pytest
from PIL import Image

from tests.test_browser import CHROMIUM, FLAGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)"),
]
WAIT = 120_000  # ms; a loaded 2-core machine starts a training process in 10-20 s


@pytest.fixture
def upload_files(tmp_path):
    files = []
    for i in range(6):
        Image.new("RGB", (64, 64), (20, 40 * i, 220)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"a blue zq square {i}")
        files += [tmp_path / f"img{i}.png", tmp_path / f"img{i}.txt"]
    (tmp_path / "broken.png").write_text("this is no picture")
    return [str(f) for f in files + [tmp_path / "broken.png"]]


def _status_has(page, text: str):
    page.wait_for_function(f"() => document.querySelector('#train-status').innerText.includes({json.dumps(text)})",
                           timeout=WAIT)


def _state_is(page, state: str):
    """The status line starts with the job's state ("stopped · step 12/5000 ..."); notes below it may also say
    "stopped", so only the first word counts."""
    page.wait_for_function("() => document.querySelector('#train-status').innerText.trim()"
                           f".startsWith({json.dumps(state + ' ·')})", timeout=WAIT)


def _open_train_tab(page):
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-btn").wait_for()


def test_train_stop_resume_reload_kill_finish_and_use(app_server, upload_files, tiny_captioner, tmp_path):
    from playwright.sync_api import sync_playwright

    url, engine = app_server
    shot = lambda page, name: page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)  # noqa: E731
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(url)
        _open_train_tab(page)
        page.locator("#train-files input[type=file]").set_input_files(upload_files)
        page.wait_for_function("() => document.querySelector('#train-data-note').innerText.includes('6 image')",
                               timeout=WAIT)
        assert "broken.png (not an image" in page.locator("#train-data-note").inner_text()
        # what the preset will set, and the trigger it finds in the captions (the note follows the upload)
        page.wait_for_function("() => document.querySelector('#train-preset-note').innerText.includes(\"trigger 'zq'\")",
                               timeout=WAIT)
        assert "sd1-lora-cpu" in page.locator("#train-preset-note").inner_text()
        page.locator("#train-trigger textarea").fill("zq")
        page.locator("#train-autocaption").get_by_text("Auto-caption").click()  # an image-to-text model captions
        page.locator("#train-captioner textarea").fill(str(tiny_captioner))
        page.get_by_label("Replace existing captions").check()
        page.locator("#train-caption-btn").click()
        page.wait_for_function("() => document.querySelector('#train-data-note').innerText.includes('6 caption(s)')",
                               timeout=WAIT)
        table = page.locator("#train-captions").inner_text()
        assert table.count("zq, ") == 6 and "a blue zq square" not in table  # replaced, trigger in front
        page.locator("#train-advanced").get_by_text("Advanced").click()
        page.locator("#train-steps textarea").fill("5000")  # long enough to stop it by hand
        shot(page, "1-upload")

        page.locator("#train-btn").click()
        _state_is(page, "running")
        job = engine.jobs.running()
        assert job and engine.jobs.view(job).config["trigger"] == "zq"
        while len(engine.jobs.view(job).losses) < 3:
            page.wait_for_timeout(200)
        page.wait_for_timeout(2500)  # one more poll of the tab draws them
        assert page.locator("#train-loss").locator("canvas, svg").count() > 0
        shot(page, "2-running")

        page.reload()  # a reload (or a second tab) finds the running job again, and the data this browser staged
        _open_train_tab(page)
        _status_has(page, job)
        _state_is(page, "running")
        page.wait_for_function("() => document.querySelector('#train-data-note').innerText.includes('6 image')",
                               timeout=WAIT)
        assert page.locator("#train-captions").inner_text().count("zq, ") == 6
        shot(page, "3-reattached")

        page.locator("#train-stop").click()
        _state_is(page, "stopped")
        stopped_at = engine.jobs.view(job).step
        page.locator("#train-resume").click()
        _state_is(page, "running")
        while engine.jobs.view(job).step <= stopped_at:
            page.wait_for_timeout(200)
        pid = json.loads((engine.jobs.folder(job) / "status.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        _state_is(page, "interrupted")
        shot(page, "4-interrupted")
        page.locator("#train-resume").click()
        _state_is(page, "running")
        page.locator("#train-stop").click()
        _state_is(page, "stopped")
        page.locator("#train-more").click()  # 100 more steps from where it stopped, then finished
        _state_is(page, "finished")
        view = engine.jobs.view(job)
        assert view.step == view.total and (view.folder / "pytorch_lora_weights.safetensors").is_file()
        shot(page, "5-finished")

        page.locator("#train-download").click()
        page.locator("#train-zip a").first.wait_for(timeout=WAIT)
        page.locator("#train-use").click()
        prompt = page.get_by_label("Prompt", exact=True)
        prompt.wait_for()
        page.wait_for_function("() => document.querySelector('#lora textarea').value.includes(':1')", timeout=WAIT)
        assert page.locator("#lora textarea").input_value() == f"{view.folder.name}:1"  # its name, not a path
        prompt.fill("a blue zq square")
        page.locator("#generate-btn").click()
        page.wait_for_function("() => document.querySelector('#infotext textarea').value.includes('Lora: ')",
                               timeout=WAIT)
        assert f'Lora: "{job}:1"' in page.locator("#infotext textarea").input_value()  # A1111 quotes a value with ':'
        shot(page, "6-generated")
        browser.close()


def test_on_a_public_app_each_browser_sees_only_its_own_runs(tiny_model_dirs, upload_files, tmp_path):
    """A public app (bound to every interface, no --auth) with training on: one visitor trains; a second browser
    (another visitor) sees no run of theirs, while the first, after a reload, is shown their run again."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import running_app

    argv = ["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(tmp_path / "out"), "--host", "0.0.0.0",
            "--allow-training"]
    with running_app(argv) as (url, engine), sync_playwright() as pw:
        url = url.replace("0.0.0.0", "127.0.0.1")
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        ann, bob = (browser.new_context(viewport={"width": 1400, "height": 1200}).new_page() for _ in range(2))
        ann.goto(url)
        _open_train_tab(ann)
        ann.locator("#train-files input[type=file]").set_input_files(upload_files)
        ann.wait_for_function("() => document.querySelector('#train-data-note').innerText.includes('6 image')",
                              timeout=WAIT)
        ann.locator("#train-advanced").get_by_text("Advanced").click()
        ann.locator("#train-steps textarea").fill("3")
        ann.locator("#train-btn").click()
        _state_is(ann, "finished")
        job = engine.jobs.jobs()[0]
        assert job in ann.locator("#train-runs").inner_text()

        bob.goto(url)
        _open_train_tab(bob)
        bob.wait_for_timeout(5000)  # two polls of the tab
        assert job not in bob.locator("body").inner_text()
        assert "No training job yet." in bob.locator("#train-status").inner_text()
        bob.locator("#train-stop").click()  # nothing of theirs to stop: the other run is untouched
        bob.wait_for_timeout(1000)
        assert not (engine.jobs.folder(job) / "STOP").exists()

        ann.reload()
        _open_train_tab(ann)
        _status_has(ann, job)
        assert job in ann.locator("#train-runs").inner_text()
        shown = ann.locator("body").inner_text() + ann.locator("#train-log textarea").input_value()
        assert "loaded sd15" in shown and str(tiny_model_dirs["sd15"]) not in shown and str(tmp_path) not in shown
        ann.screenshot(path=str(tmp_path / "ann.png"), full_page=True)
        bob.screenshot(path=str(tmp_path / "bob.png"), full_page=True)
        browser.close()
