"""Shared pytest setup: never touch the network, and offer tiny offline SD models."""

import contextlib
import os

# Set before anything imports huggingface_hub (it reads these once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

# Repo ids under which the `hf_cache` fixture stores the tiny models.
TINY_REPO_IDS = {"sd15": "tiny/sd15", "sd2v": "tiny/sd2v", "sdxl": "tiny/sdxl"}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """{"sd15" | "sd2v" | "sdxl": Path} of saved tiny diffusers folders, built once per session."""
    # Imported here so test runs that never use the fixture don't pay for importing torch.
    from tests.tiny_models import KINDS, build_tiny_sd

    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: build_tiny_sd(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    """A saved tiny random BLIP captioner folder (auto-captioning)."""
    from tests.tiny_models import build_tiny_captioner

    return build_tiny_captioner(tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, tiny_model_dirs):
    """A Hub cache dir holding the tiny models as "tiny/sd15", "tiny/sd2v", "tiny/sdxl".

    Pass it as ``cache_dir=`` (HF_HUB_CACHE is only read when huggingface_hub is imported).
    """
    from tests.tiny_models import fill_hf_cache

    cache_dir = tmp_path_factory.mktemp("hf_cache")
    for kind, repo_id in TINY_REPO_IDS.items():
        fill_hf_cache(cache_dir, repo_id, tiny_model_dirs[kind])
    return cache_dir


@pytest.fixture
def use_hf_cache(hf_cache, monkeypatch):
    """Point sd_demo.hub at the pre-filled cache, as a user's ~/.cache/huggingface would be."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    return hf_cache


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub (tests/fake_hub.py) on 127.0.0.1 as the Hub, online, with an empty cache: the real huggingface_hub
    client downloads from it. huggingface_hub read HF_ENDPOINT and HF_HUB_OFFLINE at import, so its constants are
    patched too."""
    from huggingface_hub import constants

    from tests.fake_hub import FakeHub

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        yield hub


@pytest.fixture(scope="session")
def loaded_models(tiny_model_dirs):
    """{kind: LoadedModel} loaded once per session through sd_demo.models (local-folder path)."""
    from sd_demo.models import load_model

    return {kind: load_model(str(path)) for kind, path in tiny_model_dirs.items()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(argv: list[str]):
    """(url, engine) of the real app (app.build_demo + app.launch) with ``argv`` on a free localhost port."""
    import app

    args = app.parse_args([*argv, "--port", str(_free_port())])
    demo = app.build_demo(args)
    _, url, _ = app.launch(demo, args, prevent_thread_lock=True, quiet=True)
    try:
        yield url, demo.engine
    finally:
        demo.close()
        job = demo.engine.jobs.running()
        if job:  # a test that failed mid-run must not leave its training process eating the next tests' cores
            demo.engine.jobs.cancel(job)


@pytest.fixture(scope="module")
def app_server(tiny_model_dirs, tmp_path_factory):
    """The app on the tiny SD 1.x model (see running_app)."""
    out = tmp_path_factory.mktemp("out")
    with running_app(["--model", str(tiny_model_dirs["sd15"]), "--outputs", str(out)]) as served:
        yield served


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes on a 2-core CPU) run only when asked for: ``-m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
