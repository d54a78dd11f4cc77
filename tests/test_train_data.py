"""sd_demo.train.data: scanning, captions, zip safety, bad input, image loading, buckets, sampler, dropout."""
import math
import pickle
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from sd_demo.train.batches import (BucketBatchSampler, TrainDataset, assign_buckets, bucket_resolutions,
                                   load_example, micro_conditioning, to_tensor)
from sd_demo.train.data import DataConfig, DatasetReport, Example, scan_dataset

RES = 64  # small training side: every test image is built in-process and stays tiny


def img(path: Path, size=(64, 64), color=(200, 40, 40), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def caption(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def scan(path, **kw) -> DatasetReport:
    kw.setdefault("resolution", RES)
    return scan_dataset(DataConfig(path=str(path), **kw))


def png_header(path: Path, w: int, h: int) -> Path:
    """A PNG that claims w x h pixels but holds only a few bytes of data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- captions


def test_sidecar_captions(tmp_path):
    img(tmp_path / "a.png", (80, 64))
    caption(tmp_path / "a.txt", "a red\nsquare  \n")
    img(tmp_path / "sub" / "b.jpg", (64, 96))
    caption(tmp_path / "sub" / "b.txt", "a tall one")
    rep = scan(tmp_path)
    assert rep.source == "folder" and rep.skipped == [] and rep.upscaled == []
    assert [(e.path.name, e.caption, e.size) for e in rep.examples] == [
        ("a.png", "a red square", (80, 64)), ("b.jpg", "a tall one", (64, 96))]


@pytest.mark.parametrize("key", ["text", "caption"])
def test_metadata_jsonl(tmp_path, key):
    img(tmp_path / "x.png")
    img(tmp_path / "y.png")
    (tmp_path / "metadata.jsonl").write_text(
        f'{{"file_name": "x.png", "{key}": "ex"}}\n\n{{"file_name": "y.png", "{key}": "why"}}\n'
        f'{{"file_name": "gone.png", "{key}": "lost"}}\n')
    with pytest.warns(UserWarning, match="gone.png"):
        rep = scan(tmp_path)
    assert rep.source == "metadata.jsonl"
    assert {e.path.name: e.caption for e in rep.examples} == {"x.png": "ex", "y.png": "why"}
    assert rep.skipped == [("gone.png", "listed in metadata.jsonl but not found")]


@pytest.mark.parametrize("line", ['{oops', r'{"file_name": "x\u0000.png"}', r'{"file_name": "\ud800"}',
                                  r'{"file_name": "x.png", "text": "a \udfff cat"}'])
def test_metadata_bad_line_names_it(tmp_path, line):
    """Also a NUL or a lone surrogate, which JSON escapes carry: a raw ValueError ('embedded null byte'), or a caption
    the tokenizer failed on after the model load."""
    img(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl line 2"):
        scan(tmp_path)


def test_instance_prompt_for_all_images(tmp_path):
    img(tmp_path / "a.png")
    img(tmp_path / "b.png")
    rep = scan(tmp_path, instance_prompt=" a photo of sks dog ")
    assert rep.source == "instance prompt"
    assert [e.caption for e in rep.examples] == ["a photo of sks dog"] * 2


def test_trigger_prepended_only_where_missing(tmp_path):
    for name, text in [("a", "a SKS dog on grass"), ("b", "a dog on grass"), ("c", "a sksdog")]:
        img(tmp_path / f"{name}.png")
        caption(tmp_path / f"{name}.txt", text)
    rep = scan(tmp_path, trigger="sks")
    assert [e.caption for e in rep.examples] == ["a SKS dog on grass", "sks, a dog on grass", "sks, a sksdog"]


def test_missing_captions_error_says_count_and_fix(tmp_path):
    for name in "abc":
        img(tmp_path / f"{name}.png")
    caption(tmp_path / "a.txt", "has one")
    with pytest.raises(ValueError, match=r"2 of 3 images have no caption \(b.png, c.png\).*\.txt.*instance prompt"):
        scan(tmp_path)
    assert len(scan(tmp_path, instance_prompt="photo").examples) == 3  # the stated fix works
    # so does a trigger word alone (the Training tab's note says either fills them)
    rep = scan(tmp_path, trigger="zq")
    assert [e.caption for e in rep.examples] == ["zq, has one", "zq", "zq"] and rep.source == "folder"
    (tmp_path / "a.txt").unlink()
    assert scan(tmp_path, trigger="zq").source == "trigger"


# ---------------------------------------------------------------- zip


def test_zip_extracts_into_fresh_dir(tmp_path):
    src = tmp_path / "src"
    img(src / "pets" / "a.png")
    caption(src / "pets" / "a.txt", "a cat")
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as zf:
        zf.write(src / "pets" / "a.png", "pets/a.png")
        zf.write(src / "pets" / "a.txt", "pets/a.txt")
        zf.writestr("__MACOSX/pets/._a.png", b"junk")
    cache = tmp_path / "cache"
    cache.mkdir()
    rep = scan_dataset(DataConfig(path=str(tmp_path / "data.zip"), resolution=RES), extract_root=cache)
    assert rep.source == "zip:data.zip:folder" and rep.skipped == []
    assert [e.caption for e in rep.examples] == ["a cat"]
    assert rep.extract_dir.parent == cache and rep.examples[0].path.is_relative_to(rep.extract_dir)
    clone = pickle.loads(pickle.dumps(TrainDataset(rep, DataConfig(path="x", resolution=RES))))  # spawn workers
    assert clone.examples[0].path == rep.examples[0].path
    del clone  # a copy never deletes the files
    examples = rep.examples
    del rep
    assert examples[0].path.exists()  # the examples alone keep the extracted files alive
    del examples
    assert list(cache.iterdir()) == []  # and nothing is left once they are gone


def _symlink_entry(zf: zipfile.ZipFile):
    info = zipfile.ZipInfo("link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, "/etc/passwd")


@pytest.mark.parametrize("entry,bad", [
    (lambda zf: zf.writestr("../evil.txt", "x"), "../evil.txt"),
    (lambda zf: zf.writestr("/tmp/abs_evil.txt", "x"), "/tmp/abs_evil.txt"),
    (_symlink_entry, "link.png"),
])
def test_zip_unsafe_entries_refused(tmp_path, entry, bad):
    good = img(tmp_path / "a.png")
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        zf.write(good, "a.png")
        zf.writestr("a.txt", "a cat")
        entry(zf)
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ValueError, match=f"'{bad}'.*refusing"):
        scan_dataset(DataConfig(path=str(tmp_path / "bad.zip"), resolution=RES), extract_root=cache)
    assert list(cache.iterdir()) == []  # nothing extracted, nothing left behind
    assert not any(p.name in ("evil.txt", "abs_evil.txt") for p in tmp_path.rglob("*"))
    assert not Path("/tmp/abs_evil.txt").exists()


# ---------------------------------------------------------------- bad input


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden files do not count
    with pytest.raises(ValueError, match="is empty"):
        scan(tmp_path)


def test_only_unusable_files_error_lists_them(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(ValueError, match=r"no usable images.*broken.png \(not an image.*notes.md"):
        scan(tmp_path, instance_prompt="x")


def test_truncated_jpeg_skipped_and_listed(tmp_path):
    img(tmp_path / "good.png")
    caption(tmp_path / "bad.txt", "its caption is not reported as an orphan")
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "bad.jpg")
    data = (tmp_path / "bad.jpg").read_bytes()
    (tmp_path / "bad.jpg").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\): bad.jpg"):
        rep = scan(tmp_path, instance_prompt="x")
    assert [e.path.name for e in rep.examples] == ["good.png"]
    assert rep.skipped[0][0] == "bad.jpg" and "truncated" in rep.skipped[0][1]


def test_png_with_valid_crcs_around_a_corrupt_pixel_stream_is_skipped_and_named(tmp_path):
    """Every chunk's CRC is right, only the compressed pixels are garbage: the scan must decode to see it (it passed
    the scan and aborted training after the model load, naming no file)."""
    img(tmp_path / "good.png")
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "bad.png")
    data = bytearray((tmp_path / "bad.png").read_bytes())
    at = data.index(b"IDAT")
    n = struct.unpack(">I", data[at - 4:at])[0]
    pixels = bytes(b ^ 0x5A if 20 <= k < 400 else b for k, b in enumerate(data[at + 4:at + 4 + n]))
    data[at + 4:at + 8 + n] = pixels + struct.pack(">I", zlib.crc32(b"IDAT" + pixels))
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\): bad.png \(corrupt"):
        rep = scan(tmp_path, instance_prompt="x")
    assert [e.path.name for e in rep.examples] == ["good.png"]
    assert load_example(rep.examples[0], (RES, RES)).size == (RES, RES)


def test_a_huge_caption_is_cut_with_a_warning_and_costs_nothing(tmp_path):
    """A 10 MB caption (a pasted log, a wrong file) cost 3.4 GB in the tokenizer and flooded the log: it is read
    only as far as a caption can use, cut to MAX_CAPTION characters, and the cut is reported once."""
    import tracemalloc

    from sd_demo.train.data import MAX_CAPTION

    img(tmp_path / "a.png")
    caption(tmp_path / "a.txt", "a red square " + "and more words " * 700_000)
    img(tmp_path / "b.png")
    caption(tmp_path / "b.txt", "a short one")
    tracemalloc.start()
    with pytest.warns(UserWarning, match=rf"1 caption\(s\) cut to {MAX_CAPTION} characters.*a.png"):
        rep = scan(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, f"scanning read the whole caption: {peak / 2**20:.1f} MB"
    assert len(rep.examples[0].caption) == MAX_CAPTION and rep.examples[0].caption.startswith("a red square and")
    assert rep.examples[1].caption == "a short one"


def test_small_image_upscaled_with_warning(tmp_path):
    img(tmp_path / "small.png", (32, 40))
    img(tmp_path / "big.png", (64, 64))
    with pytest.warns(UserWarning, match="1 image.*upscaled.*small.png"):
        rep = scan(tmp_path, instance_prompt="x")
    assert rep.upscaled == ["small.png"]
    assert load_example(rep.examples[1], (RES, RES)).size == (RES, RES)


def test_decompression_bomb_refused_without_decoding(tmp_path, monkeypatch):
    img(tmp_path / "ok.png")
    png_header(tmp_path / "bomb81mp.png", 9000, 9000)  # over our 64 MP cap, under PIL's own limit
    png_header(tmp_path / "bomb400mp.png", 20000, 20000)  # over PIL's limit too

    real_load = ImageFile.ImageFile.load

    def no_decode(self):  # the scan decodes usable images (to catch corrupt pixels), never one over the cap
        if self.size[0] * self.size[1] > 1000 * 1000:
            raise AssertionError(f"scan decoded the pixels of a {self.size} image")
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.warns(UserWarning, match="skipped 2"):
        rep = scan(tmp_path, instance_prompt="x")
    monkeypatch.undo()
    assert [e.path.name for e in rep.examples] == ["ok.png"]
    reasons = dict(rep.skipped)
    assert "81 MP is over the 64 MP limit" in reasons["bomb81mp.png"]
    assert "decompression-bomb" in reasons["bomb400mp.png"]
    with pytest.raises(ValueError, match=r"ok.png \(64x64 = 0.0041 MP is over the 0.001 MP limit.*raise max_pixels"):
        scan(tmp_path, instance_prompt="x", max_pixels=1000)


def test_config_validation():
    with pytest.raises(ValueError, match="resolution"):
        DataConfig(path="x", resolution=100).validate()
    with pytest.raises(ValueError, match="multiple of 64 with buckets"):
        DataConfig(path="x", resolution=520, buckets=True).validate()
    from sd_demo.train.config import TrainConfig

    with pytest.raises(ValueError, match="caption_dropout"):  # dropout is drawn by the loop: TrainConfig checks it
        TrainConfig(data="x", out="y", caption_dropout=1.0).validate()


# ---------------------------------------------------------------- loading


def test_exif_rotation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high: left half red, right half blue
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    with pytest.warns(UserWarning, match="upscaled"):  # 20 px wide at resolution 64
        rep = scan(tmp_path, instance_prompt="x")
    ex = rep.examples[0]
    assert ex.size == (20, 40)  # displayed: 20 wide, 40 high
    out = load_example(ex, (20, 40))
    assert out.size == (20, 40)
    assert out.getpixel((10, 5)) == (255, 0, 0) and out.getpixel((10, 35)) == (0, 0, 255)  # red on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_composited_on_white(tmp_path, mode):
    im = Image.new("RGBA", (64, 64), (0, 255, 0, 0))  # transparent (green) left half
    im.paste((255, 0, 0, 255), (32, 0, 64, 64))  # opaque red right half
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":
        im = im.convert("P")
        im.info["transparency"] = im.getpixel((0, 0))
    im.save(tmp_path / "t.png", **({"transparency": im.info["transparency"]} if mode == "P" else {}))
    out = load_example(Example(tmp_path / "t.png", "x", (64, 64)), (64, 64))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((60, 5)) == ((76, 76, 76) if mode == "LA" else (255, 0, 0))


def test_sdxl_micro_conditioning_describes_the_crop_load_example_makes(tmp_path):
    """(original h, w, crop top, left, target h, w): the crop is where load_example cut, also for seeded random
    crops and flips, computed without loading the image."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)  # every pixel different: a crop is identifiable
    Image.fromarray(a).save(tmp_path / "n.png")
    ex = Example(tmp_path / "n.png", "x", (150, 90))
    assert micro_conditioning(ex, (64, 64)) == (90, 150, 0, 21, 64, 64)  # resized to 107 x 64, centre cut
    resized = np.asarray(Image.fromarray(a).resize((107, 64), Image.Resampling.LANCZOS, reducing_gap=3.0))
    for flip in (False, True):
        _, _, top, left, _, _ = micro_conditioning(ex, (64, 64), center_crop=False, flip=flip)
        got = np.asarray(load_example(ex, (64, 64), center_crop=False, flip=flip))
        if flip:  # measured from the right edge: the flipped image is the mirrored crop
            got, left = got[:, ::-1], 107 - 64 - left
        assert top == 0 and np.array_equal(got, resized[top:top + 64, left:left + 64])


def test_cover_crop_and_tensor(tmp_path):
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, 96:] = 255  # white right quarter: gone after a centre crop to a square
    Image.fromarray(a).save(tmp_path / "w.png")
    ex = Example(tmp_path / "w.png", "x", (128, 64))
    center = load_example(ex, (64, 64))
    assert center.size == (64, 64) and center.getpixel((63, 32)) == (0, 0, 0)
    flipped = load_example(ex, (64, 64), flip=True)
    assert np.array_equal(np.asarray(flipped), np.asarray(center)[:, ::-1])
    r1 = load_example(ex, (64, 64), center_crop=False)  # no rng: seeded from the file name, repeatable
    assert np.array_equal(np.asarray(r1), np.asarray(load_example(ex, (64, 64), center_crop=False)))
    t = to_tensor(Image.new("RGB", (3, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[0].eq(1).all() and t[1].eq(-1).all() and abs(t[2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6


# ---------------------------------------------------------------- buckets


def test_bucket_resolutions_shape():
    for res in (512, 1024):
        bs = bucket_resolutions(res)
        assert (res, res) in bs
        for h, w in bs:
            assert h % 64 == 0 and w % 64 == 0
            assert 0.85 * res * res <= h * w <= res * res
            assert max(h, w) / min(h, w) <= 2.0
    assert (1408, 704) in bucket_resolutions(1024) and (704, 1408) in bucket_resolutions(1024)


def test_wide_image_in_wide_bucket(tmp_path):
    (h, w), (th, tw), (sh, sw) = assign_buckets([(1024, 512), (512, 1024), (300, 310)], 512)
    assert w > h and w / h >= 1.6 and abs(h * w / 512**2 - 1) < 0.1
    assert (th, tw) == (w, h) and (sh, sw) == (512, 512)
    img(tmp_path / "wide.png", (256, 128))
    img(tmp_path / "sq.png", (128, 128))
    with pytest.warns(UserWarning, match="upscaled"):  # 128 px images at a 64-multiple resolution of 128
        rep = scan(tmp_path, instance_prompt="x", resolution=192, buckets=True)
    ds = TrainDataset(rep, DataConfig(path=str(tmp_path), resolution=192, buckets=True))
    pixels = {ex.path.name: (ds.bucket(i), to_tensor(load_example(ex, ds.bucket(i)[::-1])))
              for i, ex in enumerate(rep.examples)}  # as the loop loads them for the VAE: target (w, h)
    (bh, bw), wide = pixels["wide.png"]
    assert bw > bh and wide.shape == (3, bh, bw)
    assert pixels["sq.png"][1].shape == (3, 192, 192)


# ---------------------------------------------------------------- sampler and dataset


class FakeDataset:
    """Buckets only: the sampler never loads images."""

    def __init__(self, buckets):
        self.buckets = buckets

    def __len__(self):
        return len(self.buckets)

    def bucket(self, i):
        return self.buckets[i]


def _fake(n=23):
    kinds = [(64, 64), (64, 128), (128, 64)]
    return FakeDataset([kinds[i % 3] if i % 5 else kinds[0] for i in range(n)])


def test_sampler_single_bucket_batches_and_deterministic():
    ds = _fake()
    s = BucketBatchSampler(ds, 4, seed=7)
    e0 = list(s)
    assert len(e0) == len(s)
    assert sorted(i for b in e0 for i in b) == list(range(len(ds)))  # every item exactly once
    assert all(len({ds.bucket(i) for i in b}) == 1 and 1 <= len(b) <= 4 for b in e0)
    assert e0 == list(BucketBatchSampler(ds, 4, seed=7))
    assert e0 != list(BucketBatchSampler(ds, 4, seed=8))
    e1 = list(s)  # iterating a used-up epoch starts the next one
    assert s.epoch == 1 and e1 != e0 and e1 == s.batches(1)
    dl = BucketBatchSampler(ds, 4, seed=7, drop_last=True)
    assert all(len(b) == 4 for b in dl) and len(dl) == len(list(dl.batches(0)))


def _run(sampler, n_batches, stop_at=None):
    """Consume like the training loop does (next epoch when one runs out); returns batches and a state."""
    out, state, it = [], None, iter(sampler)
    while len(out) < n_batches:
        try:
            out.append(next(it))
        except StopIteration:
            sampler.set_epoch(sampler.epoch + 1)
            it = iter(sampler)
            continue
        if len(out) == stop_at:
            state = dict(sampler.state_dict())
    return out, state


@pytest.mark.parametrize("where", ["mid epoch", "epoch end", "next epoch"])
def test_sampler_resume_continues_exact_sequence(where):
    per_epoch = len(BucketBatchSampler(_fake(), 4, seed=3))
    stop_at = {"mid epoch": 3, "epoch end": per_epoch, "next epoch": per_epoch + 2}[where]
    full, state = _run(BucketBatchSampler(_fake(), 4, seed=3), 16, stop_at=stop_at)
    resumed = BucketBatchSampler(_fake(), 4, seed=3)
    resumed.load_state_dict(state)
    rest, _ = _run(resumed, 16 - stop_at)
    assert full[:stop_at] + rest == full


def test_sampler_resume_refuses_other_batch_size():
    state = BucketBatchSampler(_fake(), 4, seed=3).state_dict()
    with pytest.raises(ValueError, match="batch_size is 4, this run has 2"):
        BucketBatchSampler(_fake(), 2, seed=3).load_state_dict(state)


def _report(n):
    return DatasetReport([Example(Path(f"{i}.png"), f"caption {i}", (64, 64)) for i in range(n)], [], [], "folder")


def test_no_warnings_on_clean_data(tmp_path):
    img(tmp_path / "a.png")
    caption(tmp_path / "a.txt", "fine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan(tmp_path)
    assert math.isclose(to_tensor(load_example(scan(tmp_path).examples[0], (RES, RES))).mean().item(),
                        ((200 + 40 + 40) / 3) / 127.5 - 1, abs_tol=1e-2)


def test_thousands_of_skipped_files_are_summarised(tmp_path):
    """A folder of 3000 stray files (a wrong export, an unpacked archive) is one summary line at the scan and at
    most WARNED_FILES lines plus one at the end of the run, not a line each."""
    from sd_demo.train.loop import WARNED_FILES, report_warnings

    img(tmp_path / "ok.png")
    for i in range(3000):
        (tmp_path / f"junk{i:04d}.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = scan(tmp_path, instance_prompt="x")
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and lines[0].startswith("skipped 3000 file(s)") and "and 2995 more" in lines[0]
    end = report_warnings(rep)
    assert len(end) == WARNED_FILES + 1 and end[-1] == f"... and {3000 - WARNED_FILES} more skipped files"
