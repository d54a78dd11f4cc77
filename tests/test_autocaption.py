"""Auto-captioning in the Training tab: an image-to-text model (a tiny random BLIP built here) captions the images
that have none, the trigger word goes in front, the user's own captions stay, and a model that is neither a folder
nor cached is refused offline with one line saying what to do."""
import pytest
from PIL import Image

from sd_demo.engine import Engine, EngineSettings
from sd_demo.train import autocaption, staging
from tests.tiny_models import CAPTION_WORDS, fill_hf_cache


@pytest.fixture
def captioner(tiny_captioner):
    return tiny_captioner


def _folder(root, n=3):
    folder = root / "data"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (48, 40), (80 * i, 40, 200 - 60 * i)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("my own words\n")  # the user's caption
    return folder


def _model_words(caption: str) -> set[str]:
    return set(caption.replace(",", " ").split())


def test_images_without_captions_get_the_models_words_and_the_trigger(captioner, tmp_path):
    folder = _folder(tmp_path)
    staged, n = autocaption.caption_folder(folder, str(captioner), trigger="zkring")
    rows = dict(staged.rows)
    assert n == 2 and rows["0.png"] == "my own words"  # kept
    processor, model = autocaption.load_captioner(str(captioner))
    direct = autocaption.caption_images(processor, model, [folder / "1.png", folder / "2.png"])
    for name, text in zip(("1.png", "2.png"), direct):
        assert text and rows[name] == f"zkring, {text}"  # what the model said, trigger in front
        assert (folder / name).with_suffix(".txt").read_text().strip() == rows[name]  # saved beside the image
        assert _model_words(text) <= set(CAPTION_WORDS)
    # the training data reads them back as the captions
    assert dict(staging.inventory(folder).rows) == rows

    staged, n = autocaption.caption_folder(folder, str(captioner), trigger="zkring", overwrite=True)
    assert n == 3 and dict(staged.rows)["0.png"].startswith("zkring, ")


def test_a_cached_hub_captioner_is_used_offline_and_a_missing_one_is_refused(captioner, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    fill_hf_cache(cache, "tiny/blip", captioner)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    folder = _folder(tmp_path)
    _, n = autocaption.caption_folder(folder, "tiny/blip")
    assert n == 2
    with pytest.raises(ValueError) as err:
        autocaption.caption_folder(folder, "someone/not-downloaded", overwrite=True)
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg and "someone/not-downloaded" in msg


def test_engine_captions_only_staged_folders_and_public_apps_only_the_default(captioner, tmp_path):
    engine = Engine(EngineSettings(outputs=str(tmp_path / "outputs")))
    img = tmp_path / "up.png"
    Image.new("RGB", (40, 40), "red").save(img)
    staged = engine.stage_training_data([str(img)])
    _, n = engine.auto_caption(str(staged.folder), str(captioner), trigger="zq")
    assert n == 1 and staged.folder.joinpath("up.txt").read_text().startswith("zq, ")
    with pytest.raises(ValueError, match="upload the training images again"):
        engine.auto_caption(str(tmp_path), str(captioner))  # not a folder this engine staged
    with pytest.raises(ValueError, match="offers only"):
        engine.auto_caption(str(staged.folder), str(captioner), public=True)
