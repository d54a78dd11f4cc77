"""The Models tab's backend (issue 18) against a local Hub (tests/fake_hub.py) through the real huggingface_hub
client: search, a download with progress that is then run, a LoRA from a repo id used in a generation, the cache
listed and cleaned, and what a public app refuses."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from sd_demo import hub
from sd_demo.engine import Engine, EngineSettings
from sd_demo.generate import GenerationParams
from sd_demo.ui import models as models_tab
from tests.tiny_models import build_tiny_lora

TINY = dict(prompt="a red circle", steps=2, width=64, height=64, seed=3)


@pytest.fixture
def hub_repos(fake_hub, tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["sd15"]
    fake_hub.add("acme/tiny-sd", source, downloads=10, likes=50)
    fake_hub.add("acme/popular-sd", source, downloads=1000, likes=5)
    build_tiny_lora(source, tmp_path / "lora")
    fake_hub.add("me/red-lora", tmp_path / "lora", tags=("lora", "base_model:adapter:acme/tiny-sd"), downloads=3)
    fake_hub.add("me/other-lora", tmp_path / "lora", tags=("lora", "base_model:adapter:someone/else"), downloads=9)
    return fake_hub


@pytest.fixture
def engine(tmp_path):
    return Engine(EngineSettings(model="embedded", outputs=str(tmp_path / "out")))


def _pixels(engine, **kw) -> np.ndarray:
    result, _ = engine.generate(GenerationParams(**TINY), model="acme/tiny-sd", save=False, **kw)
    return np.asarray(result.images[0], dtype=np.float32)


def test_search_sorts_and_finds_loras_for_the_loaded_model(hub_repos, engine):
    rows, note = models_tab.search_rows(engine, "sd", "model", "downloads")
    assert [r[0] for r in rows] == ["acme/popular-sd", "acme/tiny-sd"] and note.startswith("2 repo(s)")
    assert [r[0] for r in models_tab.search_rows(engine, "", "model", "likes")[0]] == ["acme/tiny-sd",
                                                                                        "acme/popular-sd"]
    engine.download("acme/tiny-sd")
    engine.load("acme/tiny-sd")
    assert [r[0] for r in models_tab.search_rows(engine, "", "lora", "downloads")[0]] == ["me/red-lora"]


def test_a_public_app_searches_without_the_owners_token(hub_repos, engine, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_owner")
    assert models_tab.search_rows(engine, "sd", "model", "downloads", public=True)[0]
    assert not hub_repos.tokens  # the owner's private repos stay out of strangers' results
    assert models_tab.search_rows(engine, "sd", "model", "downloads", public=False)[0]
    assert hub_repos.tokens == {"hf_owner"}


def test_a_private_push_never_lands_in_a_public_repo(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    (tmp_path / "theirs").mkdir()
    fake_hub.add("me/public-one", tmp_path / "theirs")  # exists, public
    (tmp_path / "run").mkdir()
    weights = tmp_path / "run" / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="'me/public-one' already exists and is public"):
        hub.push_folder("me/public-one", tmp_path / "run", [weights])
    assert not (tmp_path / "theirs" / "w.safetensors").exists()
    hub.push_folder("me/public-one", tmp_path / "run", [weights], private=False)  # asked for public: pushed
    assert (tmp_path / "theirs" / "w.safetensors").read_bytes() == b"x"


def test_a_download_shows_its_progress_then_runs_and_can_be_deleted(hub_repos, engine):
    events = []
    used = engine.download("acme/tiny-sd", "model", on_progress=lambda done, total, rate: events.append((done, total)))
    assert used == "acme/tiny-sd" and events
    done, total = zip(*events)
    assert list(done) == sorted(done) and done[-1] == total[-1] > 100_000  # bytes, up to all of them
    assert set(total) == {total[-1]}  # the whole size is known from the first report on (the plan's sizes)
    print(models_tab.progress_line(*events[-1], 2**20))
    assert "acme/tiny-sd" in engine.model_choices()
    listed = {r[0]: r for r in models_tab.cache_rows(engine)}
    assert listed["acme/tiny-sd"][1] == "pipeline" and listed["embedded"][1] == "pipeline (shipped)"
    before = time.time()
    assert _pixels(engine).std() > 1  # it runs: an image, not a blank
    cached = hub.cached_repos
    with pytest.MonkeyPatch.context() as mp:  # the disk's access times left out: the engine's record alone
        mp.setattr(hub, "cached_repos", lambda: [dataclasses.replace(r, last_used=0.0) for r in cached()])
        used = [(r.repo_id, r.last_used) for r in engine.cached_models()]
    assert dict(used)["acme/tiny-sd"] >= before > dict(used)["embedded"]  # last used: now, by this run

    with pytest.raises(ValueError, match="'acme/tiny-sd' is the loaded model; load another one first"):
        engine.delete_cached("acme/tiny-sd")
    engine.load("embedded")
    freed = engine.delete_cached("acme/tiny-sd")
    assert freed > 100_000 and "acme/tiny-sd" not in {r[0] for r in models_tab.cache_rows(engine)}
    assert "acme/tiny-sd" not in engine.model_choices()
    for bad, why in (("acme/tiny-sd", "'acme/tiny-sd' is not in the local Hugging Face cache"),
                     ("not a repo!!", "'not a repo!!' is not in the local Hugging Face cache; click a row")):
        with pytest.raises(ValueError, match=why):
            engine.delete_cached(bad)


def test_a_repo_is_not_in_a_cache_that_is_not_there_yet(engine, monkeypatch, tmp_path):
    """A fresh machine has no HF cache folder: deleting says the repo is not there, not the library's error with
    this machine's path in it."""
    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path / "none")
    with pytest.raises(ValueError, match=r"^delete: 'someone/x' is not in the local Hugging Face cache; click a"):
        engine.delete_cached("someone/x")


def test_a_lora_from_a_repo_id_changes_the_image(hub_repos, engine):
    engine.download("acme/tiny-sd")
    source = engine.download("me/red-lora", "lora")
    assert source.endswith("pytorch_lora_weights.safetensors")
    assert {r[0]: r[1] for r in models_tab.cache_rows(engine)}["me/red-lora"] == "LoRA"
    plain, with_lora = _pixels(engine), _pixels(engine, loras=[(source, 1.0)])
    assert np.abs(plain - with_lora).mean() > 1


def test_an_images_loras_are_named_by_hub_id_and_found_again(hub_repos, engine, tmp_path):
    """A LoRA fetched from the Hub is named by its repo id in the image's parameters (not by the cached file's name,
    which says nothing elsewhere); PNG Info finds it in the cache, offers to download what is missing (not on a
    public app), and names what it cannot find."""
    engine.download("acme/tiny-sd")
    source = engine.download("me/red-lora", "lora")
    result, _ = engine.generate(GenerationParams(**TINY), model="acme/tiny-sd", save=False, loras=[(source, 0.5)])
    named = result.infotexts[0].params["Lora"]
    assert named == "me/red-lora:0.5"
    here, fetch, unknown = engine.locate_loras(f"{named}, me/other-lora:0.8, my-old-file.safetensors")
    assert here == [f"{source}:0.5"] and fetch == ["me/other-lora:0.8"] and unknown == ["my-old-file.safetensors"]
    assert engine.locate_loras("me/other-lora", public=True) == ([], [], ["me/other-lora"])


def test_what_is_cached_is_used_in_generate_also_offline(hub_repos, engine, monkeypatch):
    engine.download("acme/tiny-sd")
    downloaded = engine.download("me/red-lora", "lora")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a later session, without network
    assert engine.use_cached("acme/tiny-sd") == ("model", "acme/tiny-sd")
    assert engine.use_cached("me/red-lora") == ("lora", downloaded)
    with pytest.raises(ValueError, match="'acme/popular-sd' is not on this machine; download it first"):
        engine.use_cached("acme/popular-sd")
    with pytest.raises(ValueError, match="not offered on this public app"):
        engine.use_cached("me/red-lora", public=True)


def test_a_public_app_neither_downloads_nor_deletes(hub_repos, engine):
    with pytest.raises(ValueError, match="download: not offered on this public app"):
        engine.download("acme/tiny-sd", public=True)
    with pytest.raises(ValueError, match="delete: not offered on this public app"):
        engine.delete_cached("acme/tiny-sd", public=True)
    assert not hub_repos.downloads("model_index.json")


def test_a_pinned_revision_and_a_gated_repo(hub_repos, engine, tiny_model_dirs, monkeypatch):
    hub_repos.add("acme/pinned", tiny_model_dirs["sd15"], revisions=("main", "v1"))
    hub_repos.add("acme/gated", tiny_model_dirs["sd15"], gated=True)
    assert engine.download("acme/pinned@v1") == "acme/pinned@v1"
    commit = hub_repos.repos["acme/pinned"].revisions["v1"]
    assert any(f"/acme/pinned/resolve/{commit}/" in path or "/acme/pinned/resolve/v1/" in path
               for _, path, _ in hub_repos.requests)
    for token in (None, "hf_someone"):  # no token: 401; a token without access: 403
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(ValueError, match="'acme/gated' is gated: accept its license on the Hub and log in"):
            engine.download("acme/gated")


@pytest.mark.parametrize("spec, needle", [
    ("./folder", "not a Hub repo id"),
    ("embedded", "is not a Hub repo id"),
    ("acme/missing", "no such repo on the Hub"),
    ("acme/tiny-sd@v9", "has no revision 'v9'"),
])
def test_bad_downloads_are_one_line(hub_repos, engine, spec, needle):
    with pytest.raises(ValueError, match=needle) as err:
        engine.download(spec)
    assert "\n" not in str(err.value)


def test_offline_search_says_so(engine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows, note = models_tab.search_rows(engine, "sd", "model", "downloads")
    assert rows == [] and "offline" in note
    assert models_tab.cache_rows(engine)[0][0] == "embedded"
