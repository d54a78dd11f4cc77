"""Downloads from the Hub through the real huggingface_hub client, against a local stand-in (tests/fake_hub.py):
a connection dropped mid-file, and a download that fails until later (issue 17's faults, issue 18's downloads).

huggingface_hub 2.x resumes a dropped file with Range within one call (and retries while bytes keep coming); a
call that gives up deletes its partial file, so the next try keeps the whole files and fetches the rest."""
from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from sd_demo import hub
from sd_demo.generate import GenerationParams, generate
from sd_demo.models import load_model

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def small_chunks(monkeypatch):
    """Read downloads 1 KB at a time (10 MB by default, more than a tiny model's file), so a cut lands after some
    bytes were written and a resume asks for the rest with Range, as on a real multi-GB file."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)


def _same_files(snapshot: Path, source: Path, names: list[str]) -> None:
    for name in names:
        assert (snapshot / name).read_bytes() == (source / name).read_bytes(), name


def plan_names(source: Path) -> list[str]:
    return [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]


def _runs(folder: Path) -> None:
    """The downloaded model is run, not only loaded: one 64 px image."""
    image = generate(load_model(str(folder)), GenerationParams(prompt="a red circle", steps=2, width=64, height=64,
                                                               seed=1)).images[0]
    assert image.size == (64, 64)


def test_a_connection_dropped_mid_file_resumes_where_it_stopped(fake_hub, tiny_model_dirs, small_chunks):
    source = tiny_model_dirs["sd15"]
    fake_hub.add("me/tiny", source)
    fake_hub.cut_after, fake_hub.cuts = 40_000, 1  # every file over 40 KB is cut once

    folder, plan = hub.fetch_model("me/tiny")

    ranges = fake_hub.downloads(WEIGHTS)
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert ranges[0] is None and 30_000 < resumed_at <= 40_000, ranges  # the second GET asks for the rest only
    _same_files(folder, source, plan.files)
    _runs(folder)


def test_a_download_that_keeps_failing_is_one_line_and_the_next_try_keeps_the_finished_files(fake_hub, tiny_model_dirs,
                                                                               small_chunks):
    source = tiny_model_dirs["sd15"]
    fake_hub.add("me/tiny", source)
    fake_hub.cut_only, fake_hub.cut_after, fake_hub.cuts = WEIGHTS, 40_000, 100  # the UNet's weights never finish

    with pytest.raises(ValueError) as err:
        hub.fetch_model("me/tiny")
    message = str(err.value)
    assert "\n" not in message and "me/tiny" in message and "again" in message, message
    snapshots = list(Path(hub.cache_dir()).glob("models--me--tiny/snapshots/*"))
    assert not any((s / WEIGHTS).exists() for s in snapshots)  # no half file where a load would find it

    fetched = {name: len(fake_hub.downloads(name)) for name in plan_names(source)}
    fake_hub.cuts = 0  # the network is back
    folder, plan = hub.fetch_model("me/tiny")
    again = [name for name in plan.files if len(fake_hub.downloads(name)) > fetched[name]]
    assert again == [WEIGHTS], "the next try fetches only the file that did not finish"
    _same_files(folder, source, plan.files)
    _runs(folder)
