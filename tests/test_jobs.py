"""Training jobs as the Training tab runs them: each in its own process, all state in its folder. A job killed from
outside shows as interrupted and its Resume ends exactly where an uninterrupted job ends; Stop, "train N more
steps", the result zip; bad uploads are listed and the rest trains; every method's card is right for it."""
import json
import os
import signal
import time
import zipfile

import pytest
from PIL import Image
from safetensors.torch import load_file

from sd_demo.train import jobs, staging
from sd_demo.train.config import TrainConfig


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("job_data")
    for i in range(6):
        Image.new("RGB", (64, 64), (30 * i, 120, 200)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"a blue zq square {i}")
    (d / "notes.png").write_text("not an image")  # skipped, and said so in the job's log
    return d


def _cfg(model, data, **kw):
    base = dict(method="lora", model=str(model), data=str(data), steps=8, batch=2, rank=4, alpha=4.0, lr=1e-2,
                seed=5, checkpoint_every=2, validation_every=4)
    base.update(kw)
    return TrainConfig(**base)


def _wait(manager, job, states, timeout=600):
    deadline = time.time() + timeout
    while (state := manager.state(job)) not in states:
        assert time.time() < deadline, f"job stayed {state}; log:\n{manager.log_tail(job)}"
        time.sleep(0.2)
    return state


def _lora(folder):
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_killed_job_is_interrupted_and_resumes_exactly(tiny_model_dirs, images, tmp_path):
    manager = jobs.JobManager(tmp_path / "train")
    whole = manager.start(_cfg(tiny_model_dirs["sd15"], images))
    assert _wait(manager, whole, {jobs.FINISHED, jobs.FAILED}) == jobs.FINISHED
    view = manager.view(whole)
    assert view.step == view.total == 8 and len(view.losses) == 8
    assert view.messages[0].startswith("preset sd1-lora-cpu:")  # what the preset set, for the tab
    assert view.samples and all(p.is_file() for p in view.samples)  # the live sample grid at step 4 / 8

    job = manager.start(_cfg(tiny_model_dirs["sd15"], images))
    folder = manager.folder(job)
    while not (folder / "checkpoints" / "step-000004" / "state.json").exists():
        assert manager.state(job) == jobs.RUNNING, manager.log_tail(job)
        time.sleep(0.05)
    pid = json.loads((folder / jobs.STATUS).read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # from outside, as a crash or an OOM kill would
    assert _wait(manager, job, {jobs.INTERRUPTED}, timeout=30) == jobs.INTERRUPTED
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    # A restarted server (a new manager that never spawned it) sees the same.
    assert jobs.JobManager(tmp_path / "train").state(job) == jobs.INTERRUPTED
    manager.resume(job)
    assert _wait(manager, job, {jobs.FINISHED, jobs.FAILED}) == jobs.FINISHED
    a, b = _lora(folder), _lora(manager.folder(whole))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _push(manager, job, hub, monkeypatch) -> list[str]:
    """Push a result to the local Hub (tests/fake_hub.py); the paths it received."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert manager.push(job, "me/result").endswith("/me/result")
    assert hub.created == {"me/result": "private"}, "a push is private unless asked"
    folder = hub.repos["me/result"].folder
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_stop_then_more_steps_and_the_result_zip(tiny_model_dirs, images, tmp_path, monkeypatch, fake_hub):
    manager = jobs.JobManager(tmp_path / "train")
    job = manager.start(_cfg(tiny_model_dirs["sd15"], images, steps=400))
    folder = manager.folder(job)
    while manager.view(job).step < 3:
        assert manager.state(job) == jobs.RUNNING, manager.log_tail(job)
        time.sleep(0.1)
    with pytest.raises(ValueError, match="one job at a time"):
        manager.start(_cfg(tiny_model_dirs["sd15"], images))
    manager.stop(job)
    assert _wait(manager, job, {jobs.STOPPED, jobs.FAILED}) == jobs.STOPPED
    stopped_at = manager.view(job).step
    assert 3 <= stopped_at < 400 and (folder / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
    with pytest.raises(ValueError, match="only a finished run"):
        manager.zip_result(job)
    # "Train N more steps" on a stopped run: its config now ends N steps after where it stopped
    manager.resume(job, more_steps=5)
    assert _wait(manager, job, {jobs.FINISHED, jobs.FAILED}) == jobs.FINISHED
    view = manager.view(job)
    assert view.step == view.total == stopped_at + 5
    manager.resume(job, more_steps=3)  # and again on a finished one
    assert _wait(manager, job, {jobs.FINISHED, jobs.FAILED}) == jobs.FINISHED
    assert manager.view(job).step == stopped_at + 8
    names = zipfile.ZipFile(manager.zip_result(job)).namelist()
    assert f"{job}/pytorch_lora_weights.safetensors" in names and f"{job}/README.md" in names
    assert f"{job}/{job}.safetensors" in names  # the kohya file for A1111 / ComfyUI
    assert not [n for n in names if "checkpoints" in n or n.endswith((".jsonl", "job.json", "train.log"))]
    pushed = _push(manager, job, fake_hub, monkeypatch)  # the Hub gets what the zip holds
    assert pushed == sorted(n.split("/", 1)[1] for n in names)
    log = manager.log_tail(job, lines=200)  # what the tab shows: the skip as one line, no path or code of ours
    assert "UserWarning: skipped 1 file(s): notes.png (not an image" in log and ".py:" not in log


def test_bad_uploads_are_listed_and_the_rest_is_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (200, 10, 10 * i)).save(src / f"ok{i}.png")
    (src / "ok0.txt").write_text("a red thing")
    (src / "notes.png").write_text("not an image at all")
    Image.new("RGB", (64, 64)).save(src / "cut.png")
    (src / "cut.png").write_bytes((src / "cut.png").read_bytes()[:60])
    Image.new("L", (9000, 9000)).save(src / "bomb.png")  # 81 MP: over the decompression-bomb limit
    with zipfile.ZipFile(src / "evil.zip", "w") as zf:
        zf.writestr("../escape.png", b"x")
    zipfile.ZipFile(src / "empty.zip", "w").close()
    staged = staging.stage([str(p) for p in sorted(src.iterdir())], tmp_path / "staged")
    assert [r for r, _ in staged.rows] == ["ok0.png", "ok1.png", "ok2.png"]
    skipped = dict(staged.skipped)
    assert "outside the folder" in skipped["evil.zip"]
    assert "not an image" in skipped["notes.png"] and "truncated" in skipped["cut.png"]
    assert "decompression-bomb" in skipped["bomb.png"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "staged" / "escape.png").exists()
    # captions edited in the table land beside the images; names that are not images of the folder are ignored
    staging.write_captions(tmp_path / "staged", [("ok1.png", "a  red\nthing"), ("../x.png", "no")])
    assert (tmp_path / "staged" / "ok1.txt").read_text() == "a red thing\n"
    assert dict(staging.inventory(tmp_path / "staged").rows)["ok1.png"] == "a red thing"
    with pytest.raises(ValueError, match="limited to"):
        staging.stage([str(src / "bomb.png")] * (staging.PUBLIC_MAX_FILES + 1), tmp_path / "pub", public=True)


@pytest.mark.parametrize("method,extra,lora_lines", [
    ("lora", {}, True),
    ("dreambooth", {"trigger": "zq"}, True),
    ("dreambooth", {"trigger": "zq", "dreambooth_full": True}, False),
    ("full", {}, False),
    ("textual-inversion", {"trigger": "<zq>"}, False),
])
def test_each_methods_card_is_right_for_it(tmp_path, method, extra, lora_lines):
    from sd_demo.models import ModelRef
    from sd_demo.train.card import write_card

    cfg = TrainConfig(method=method, steps=10, lr=1e-4, rank=4, alpha=4.0, resolution=64, batch=1, **extra)
    card = write_card(tmp_path, cfg, ModelRef("hub", "org/base"), [], 0.1).read_text()
    tags = card.split("---")[1]
    assert ("- lora" in tags) == lora_lines and ("| rank |" in card) == lora_lines
    assert (f"{tmp_path.name}.safetensors" in card) == lora_lines  # the kohya file exists only for adapters
    assert ("load_textual_inversion" in card) == (method == "textual-inversion")
    full = method == "full" or extra.get("dreambooth_full")
    assert (f"--model {tmp_path.name}" in card) == bool(full)


def test_generation_waits_for_a_training_job_on_a_gpu_and_shares_a_cpu(tmp_path, monkeypatch):
    """On a GPU an image waits (with a message) while a job trains, instead of running out of memory beside it;
    on a CPU it runs at once and says that it shares the cores."""
    from sd_demo.engine import Engine, EngineSettings
    from sd_demo.generate import GenerationParams

    engine = Engine(EngineSettings(outputs=str(tmp_path)))
    calls = []
    monkeypatch.setattr(engine.jobs, "running", lambda: "job-1" if len(calls.append(1) or calls) <= 4 else None)
    monkeypatch.setattr(engine, "generate", lambda *a, **k: ("the result", []))
    monkeypatch.setattr(engine, "_on_gpu", lambda: True)
    updates = list(engine.run(GenerationParams(prompt="x", steps=1)))
    assert "using the GPU" in updates[0].waiting and {u.waiting for u in updates[1:-1] if u.waiting} <= {"starting"}
    assert updates[-1].result == "the result"
    calls.clear()
    monkeypatch.setattr(engine, "_on_gpu", lambda: False)
    assert "shares the CPU cores" in engine.training_note()
    updates = list(engine.run(GenerationParams(prompt="x", steps=1)))
    assert len(updates) == 1 and updates[0].result == "the result"


def test_a_space_visitor_pushes_only_with_their_own_login_into_their_own_account(tiny_model_dirs, images, tmp_path,
                                                                                fake_hub, monkeypatch):
    """On a public app (a Space with training on) a push needs the visitor's Hugging Face login, only of a run that
    visitor started, and goes into their account with their token, never the owner's; a private app pushes with
    the owner's."""
    from sd_demo.engine import Engine, EngineSettings

    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    engine = Engine(EngineSettings(model=str(tiny_model_dirs["sd15"]), outputs=str(tmp_path)))
    job = engine.jobs.start(_cfg(tiny_model_dirs["sd15"], images, steps=1, validation_every=0), owner="alice")
    assert _wait(engine.jobs, job, {jobs.FINISHED, jobs.FAILED}) == jobs.FINISHED
    with pytest.raises(ValueError, match="only the visitor who trained a run can push it"):
        engine.push_result(job, "my-lora", public=True, visitor=("bob", "hf_bob"))  # runs are listed to all
    with pytest.raises(ValueError, match="sign in with Hugging Face"):
        engine.push_result(job, "my-lora", public=True)
    with pytest.raises(ValueError, match="you push to your own account: 'alice/NAME'"):
        engine.push_result(job, "bob/my-lora", public=True, visitor=("alice", "hf_alice"))
    assert not fake_hub.tokens  # refused before any request
    assert engine.push_result(job, "my-lora", public=True, visitor=("alice", "hf_alice")).endswith("/alice/my-lora")
    assert fake_hub.tokens == {"hf_alice"} and fake_hub.created == {"alice/my-lora": "private"}
    engine.push_result(job, "owner/run", public=False)
    assert fake_hub.tokens == {"hf_alice", "hf_owner"}
    pushed = sorted(p.name for p in fake_hub.repos["alice/my-lora"].folder.rglob("*") if p.is_file())
    assert "pytorch_lora_weights.safetensors" in pushed and "README.md" in pushed


def test_the_loss_plot_draws_steps_and_losses_as_numbers_from_its_first_loss():
    """Before a job's first loss the plot is left empty (a chart first drawn from an empty frame read step and loss
    as categories, then drew no line for the rest of the run); from the first loss on, both are numbers."""
    import gradio as gr

    from sd_demo.ui.train import loss_frame

    assert loss_frame([]) is None
    plot = gr.LinePlot(x="step", y="loss", color="series").postprocess(loss_frame([(1, 0.25, "loss"),
                                                                                   (1, 0.25, "smoothed")]))
    assert plot.datatypes == {"step": "quantitative", "loss": "quantitative", "series": "nominal"}
