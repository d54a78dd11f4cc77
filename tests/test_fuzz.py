"""Fuzz (hypothesis) over every public entry (issue 17): generation params, the train config, infotext, prompt
weighting, model and LoRA ids, dataset file names, /generate and /png_info of the running app, the Training tab's
uploads and caption table, and the CLI's argv.

The property everywhere: a value a user must change is a ValueError whose one-line message starts with the field's
name ("steps: ..."); nothing else escapes (no TypeError, IndexError, KeyError, UnicodeError, OverflowError: those
would be tracebacks). Examples are derandomized, so CI sees the same cases every run.
"""
import io
import math
import os
import struct
import zlib
from dataclasses import fields

import pytest
from gradio_client import Client, handle_file
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from sd_demo.generate import GenerationParams, params_from_infotext
from sd_demo.infotext import Infotext, format_infotext, parse_infotext, read_png
from sd_demo.models import parse_lora, parse_model_ref
from sd_demo.prompts import parse_attention
from sd_demo.train.config import TrainConfig, from_values
from sd_demo.train.data import DataConfig, scan_dataset


def fuzz(n: int):
    """Modest, reproducible runs: the whole file stays under a minute on a 2-core machine."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------- values

_SURROGATE = st.characters(categories=["Cs"])  # lone surrogates: JSON carries them, UTF-8 cannot
_TEXT = st.one_of(st.text(max_size=12), st.text(st.one_of(st.characters(), _SURROGATE), min_size=1, max_size=6))
# Texts a form or an API caller sends for a number (Python's float() reads '١٢' and '1_0' too).
_TRICKY = st.sampled_from(["", " ", "0", "-1", "1", "8", "512", "512.0", " 64 ", "64.5", "1e3", "1e400", "-1e400",
                           "nan", "inf", "-inf", "NaN", "1_0", "0x10", "١٢٣", "None", "null", "true", "False",
                           "\ud800", "a" * 5000, "9" * 5000, "embedded", "/", "~", "..", "a/b", "a/b@", "@x",
                           "DPM++ 2M", "Euler a", "Karras", "Automatic"])
_NUMBER = st.one_of(st.integers(), st.integers(min_value=2**63, max_value=2**1100), st.floats(),
                    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5, 64.5, 512.0, 2.0**64, 10**5000]))
ANY = st.one_of(st.none(), st.booleans(), _NUMBER, _TEXT, _TRICKY,
                st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def field_error(call, names):
    """call() or None; a ValueError must be one line starting with one of ``names`` ("name: why")."""
    try:
        return call()
    except ValueError as exc:
        message = str(exc)
        # "unknown model 'x': ..." is the one other form: the CLI and the Hub errors share it
        named = message.split(":", 1)[0] in names or ("model" in names and message.startswith("unknown model "))
        assert named and "\n" not in message, message
        return None


# ---------------------------------------------------------------------------------------------- GenerationParams

GEN_FIELDS = [f.name for f in fields(GenerationParams)]


@fuzz(300)
@given(st.sampled_from(GEN_FIELDS), ANY)
def test_generation_params_one_bad_field_is_named(name, value):
    p = field_error(lambda: GenerationParams(**{name: value}).validate(), {name})
    if p is not None:  # accepted: the numbers now have their field's type, and validating again changes nothing
        for n in ("seed", "batch_size", "clip_skip"):
            assert type(getattr(p, n)) is int
        for n in ("steps", "width", "height"):  # None: the model's own
            assert getattr(p, n) is None or type(getattr(p, n)) is int
        assert p.guidance_scale is None or (type(p.guidance_scale) is float and math.isfinite(p.guidance_scale))
        assert type(p.cfg_cutoff) is float and 0 <= p.cfg_cutoff <= 1
        assert p.validate() == p


@fuzz(150)
@given(st.fixed_dictionaries({}, optional={n: ANY for n in GEN_FIELDS}))
def test_generation_params_any_values_only_field_errors(values):
    field_error(lambda: GenerationParams(**values).validate(), set(GEN_FIELDS))


# ---------------------------------------------------------------------------------------------- TrainConfig

TRAIN_FIELDS = [f.name for f in fields(TrainConfig)]


def _train_check(config: TrainConfig):
    """An accepted config holds numbers a run can use: ints are ints, floats finite."""
    for f in fields(TrainConfig):
        v = getattr(config, f.name)
        if isinstance(v, float):
            assert math.isfinite(v), (f.name, v)
        if f.metadata.get("type") is int or type(f.default) is int:
            assert v is None or type(v) is int, (f.name, v)


@fuzz(300)
@given(st.sampled_from(TRAIN_FIELDS), ANY)
def test_train_form_one_bad_field_is_named(name, value):
    values = {"data": "d", "out": "o", name: value}
    config = field_error(lambda: from_values(values).validate(), set(TRAIN_FIELDS))
    if config is not None:
        _train_check(config)


@fuzz(150)
@given(st.fixed_dictionaries({}, optional={n: ANY for n in TRAIN_FIELDS}))
def test_train_form_any_values_only_field_errors(values):
    config = field_error(lambda: from_values(values).validate(), set(TRAIN_FIELDS))
    if config is not None:
        _train_check(config)


def _typed(f):
    """Values of the field's own type (what the CLI's typed flags produce), edge cases included."""
    typ = f.metadata.get("type") or type(f.default)
    if typ is bool:
        base = st.booleans()
    elif typ is int:
        base = st.integers()
    elif typ is float:
        base = st.floats()
    else:
        base = st.one_of(_TEXT, _TRICKY)
    return st.one_of(st.none(), base) if f.default is None else base


_TYPED = {f.name: _typed(f) for f in fields(TrainConfig) if f.name not in ("data", "out")}


@fuzz(200)
@given(st.fixed_dictionaries({"data": st.just("d"), "out": st.just("o")}, optional=_TYPED))
def test_train_config_typed_values_only_field_errors(values):
    config = field_error(lambda: TrainConfig(**values).validate(), set(TRAIN_FIELDS))
    if config is not None:
        _train_check(config)


# ---------------------------------------------------------------------------------------------- infotext

_LINE_CHARS = st.one_of(st.sampled_from(list(',:"\\\r\t ()<>')), st.characters(exclude_categories=["Cs"]))
_MARKERS = st.sampled_from(["Negative prompt:", "Negative prompt: x", "Steps: 1, Seed: 2, Size: 8x8",
                            'a: "b", c: d, e: f', "Prompt: p"])


def _normalize(s: str) -> str:
    # A1111 strips every line and the whole text; that much is not kept (CLIP reads the same words).
    return "\n".join(line.strip() for line in s.split("\n")).strip()


# Prompts whose lines may be the very markers the reader splits on ("\nNegative prompt:", a params-like line).
_PROMPTS = st.lists(st.one_of(st.text(_LINE_CHARS, max_size=20), _MARKERS), max_size=4).map(
    lambda lines: _normalize("\n".join(lines)))
_PARAMS = st.dictionaries(st.from_regex(r"[A-Z][a-z]{1,8}( [a-z]{1,6})?", fullmatch=True),
                          st.one_of(st.integers(), st.text(_LINE_CHARS, max_size=10)), min_size=3, max_size=5)


@fuzz(300)
@given(_PROMPTS, _PROMPTS, _PARAMS)
def test_infotext_round_trip_with_marker_lines(prompt, negative, params):
    params = {k: v for k, v in params.items() if k not in ("Prompt", "Negative prompt")}
    assume(len(params) >= 3)
    info = Infotext(prompt, negative, params)
    back = parse_infotext(format_infotext(info))
    assert (back.prompt, back.negative_prompt) == (prompt, negative)
    assert list(back.params) == list(params)


@fuzz(200)
@given(st.lists(st.one_of(_LINE_CHARS, st.sampled_from(["\n", "Negative prompt:", "Steps: 1, "]), _SURROGATE),
                max_size=30).map("".join))
def test_infotext_any_text_parses_and_sends_to_generate(text):
    info = parse_infotext(text)
    formatted = format_infotext(info)  # what PNG Info shows
    if len(info.params) >= 3:  # (fewer: A1111's format has no params line for them; they read back as prompt text)
        assert parse_infotext(formatted) == info
    p, ignored = params_from_infotext(info)  # "Send to Generate": never a traceback, bad values ignored or named
    field_error(p.validate, set(GEN_FIELDS))


# ---------------------------------------------------------------------------------------------- prompts

@fuzz(300)
@given(st.lists(st.one_of(st.sampled_from(list("()[]:\\ .,+-0123456789")), st.just("BREAK"), st.characters(),
                          st.just(":" + "9" * 400 + ")")), max_size=40).map("".join))
def test_prompt_weighting_never_fails(text):
    """Any text reads as weighted fragments with finite weights; what had to be guessed is said once."""
    wp = parse_attention(text)
    assert wp.chunks and all(isinstance(t, str) and math.isfinite(w) for c in wp.chunks for t, w in c)
    assert len(set(wp.warnings)) == len(wp.warnings)


# ---------------------------------------------------------------------------------------------- model and LoRA ids

@fuzz(300)
@given(st.one_of(ANY, st.text(st.sampled_from(list("ab-_./@~ \0")), max_size=30)))
def test_model_ref_only_model_errors(spec):
    ref = field_error(lambda: parse_model_ref(spec), {"model"})
    if ref is not None:
        assert ref.source in ("hub", "local", "embedded") and isinstance(ref.public_name, str)


@fuzz(200)
@given(st.one_of(ANY, st.text(st.sampled_from(list("ab:./0123456789e-+nafi")), max_size=20)))
def test_lora_spec_only_lora_errors(spec):
    parsed = field_error(lambda: parse_lora(spec), {"lora"})
    if parsed is not None:
        source, scale = parsed
        assert isinstance(source, str) and type(scale) is float and math.isfinite(scale)


# ---------------------------------------------------------------------------------------------- dataset names

_PNG = None


def _png_bytes() -> bytes:
    global _PNG
    if _PNG is None:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, format="PNG")
        _PNG = buf.getvalue()
    return _PNG


# Names as bytes: Linux allows anything but '/' and NUL, including bytes that are not UTF-8 (Python then hands
# back lone surrogates).
_STEM = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
_SUFFIX = st.sampled_from([b".png", b".PNG", b".jpg", b".txt", b".TXT", b".caption", b"", b".png.txt", b".jsonl"])


@pytest.mark.filterwarnings("ignore:.*(skipped|upscaled).*:UserWarning")  # the scan's own notes on odd files
@fuzz(40)
@given(st.lists(st.tuples(_STEM, _SUFFIX), min_size=1, max_size=6, unique=True), st.booleans())
def test_dataset_scan_any_file_names(tmp_path_factory, names, instance_prompt):
    """Every visible image is found under its own name, whatever bytes the name holds; hidden files are not."""
    root = os.fsencode(tmp_path_factory.mktemp("names"))
    images = set()
    for stem, suffix in names:
        name = stem + suffix
        if name in (b".", b".."):
            continue
        image = os.path.splitext(name)[1].lower() not in (b".txt", b".caption", b".jsonl")
        with open(os.path.join(root, name), "wb") as f:
            f.write(_png_bytes() if image else b"a caption " + stem.hex().encode())
        if image and not name.startswith(b"."):
            images.add(os.fsdecode(name))
    cfg = DataConfig(path=os.fsdecode(root), resolution=64, instance_prompt="a thing" if instance_prompt else None)
    try:
        report = scan_dataset(cfg)
    except ValueError as exc:  # no image, an image without a caption, or a file named metadata.jsonl: said so
        assert not images or not instance_prompt or os.path.exists(os.path.join(root, b"metadata.jsonl")), exc
        return
    assert {ex.name for ex in report.examples} == images
    assert all(ex.caption and ex.size == (8, 8) for ex in report.examples)


_JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT),
                           lambda inner: st.lists(inner, max_size=2), max_leaves=4)


@pytest.mark.filterwarnings("ignore:.*(skipped|upscaled).*:UserWarning")
@fuzz(40)
@given(st.lists(st.dictionaries(st.sampled_from(["file_name", "text", "caption", "other"]), _JSON_VALUE, max_size=3),
                max_size=3))
def test_dataset_metadata_rows_any_values(tmp_path_factory, rows):
    """metadata.jsonl rows of any JSON: the image is read, or the message names the file and the line."""
    import json

    root = tmp_path_factory.mktemp("meta")
    (root / "a.png").write_bytes(_png_bytes())
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    try:
        report = scan_dataset(DataConfig(path=str(root), resolution=64, instance_prompt="a thing"))
    except ValueError as exc:
        assert str(exc).startswith("metadata.jsonl line "), exc
        return
    assert [ex.name for ex in report.examples] == ["a.png"]
    assert all(ex.caption.encode("utf-8") for ex in report.examples)


# ---------------------------------------------------------------------------------------------- the running app

_JSON = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                  st.floats(allow_nan=False, allow_infinity=False), _TEXT, _TRICKY,
                  st.lists(st.integers(), max_size=2))
_APP_FIELDS = ["prompt", "negative_prompt", "sampler", "schedule", "steps", "guidance_scale", "width", "height",
               "seed", "batch_size", "clip_skip", "loras"]
SMALL = dict(prompt="x", steps=1, width=64, height=64, seed=1, batch_size=1)


@pytest.fixture(scope="module")
def client(app_server):
    return Client(app_server[0], verbose=False)


@fuzz(20)
@given(st.sampled_from(_APP_FIELDS), _JSON)
def test_generate_endpoint_names_the_bad_field(client, name, value):
    if name in ("steps", "batch_size") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = min(value, 2)  # a valid big value would only cost time
    if name in ("width", "height") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = min(value, 64)
    try:
        gallery, *_ = client.predict(**{**SMALL, name: value}, api_name="/generate")
    except Exception as exc:  # gradio_client's AppError carries the message the app raised
        message = str(exc)
        field = "lora" if name == "loras" else name
        assert message.startswith(f"{field}:") and "\n" not in message, message
    else:
        assert len(gallery) == 1


@pytest.mark.parametrize("loras", [True, 5, ["a"]])
def test_generate_endpoint_loras_that_are_not_text_are_named(client, loras):
    with pytest.raises(Exception, match="^lora: "):
        client.predict(**SMALL, loras=loras, api_name="/generate")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with(*chunks: bytes) -> bytes:
    raw = _png_bytes()
    return raw[:-12] + b"".join(chunks) + raw[-12:]  # before IEND


def _png_with_text(text: bytes, ctype: bytes = b"tEXt") -> bytes:
    return _png_with(_chunk(ctype, b"parameters\0" + text))


@fuzz(200)
@given(st.binary(max_size=40), st.sampled_from([b"tEXt", b"zTXt", b"iTXt"]), st.booleans())
def test_png_info_reads_the_parameters_beside_any_broken_text_chunk(junk, ctype, before):
    """A text chunk of any bytes (another tool's, or damaged) neither fails PNG Info nor hides the parameters."""
    assume(not junk.startswith(b"parameters"))
    good = _chunk(b"tEXt", b"parameters\0a cat\nNegative prompt: dogs\nSteps: 2, Seed: 3, Size: 8x8")
    bad = _chunk(ctype, junk)
    info = read_png(io.BytesIO(_png_with(bad, good) if before else _png_with(good, bad)))
    assert info == Infotext("a cat", "dogs", {"Steps": 2, "Seed": 3, "Size": "8x8"})


@fuzz(15)
@given(st.one_of(st.binary(max_size=64),
                 st.builds(_png_with_text, st.binary(max_size=40), st.sampled_from([b"tEXt", b"zTXt", b"iTXt"]))))
def test_png_info_endpoint_reads_any_upload(client, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("png") / "upload.png"
    path.write_bytes(data)
    text = client.predict(handle_file(str(path)), api_name="/png_info")
    assert isinstance(text, str)
    try:
        info = read_png(str(path))
    except Exception:  # the tab says "could not be read" for these
        info = None
    if info is not None:
        assert text == format_infotext(info)


def test_app_still_serves_after_the_fuzz(client):
    gallery, *_ = client.predict(**SMALL, api_name="/generate")
    assert len(gallery) == 1


# ---------------------------------------------------------------------------------------------- the Training tab's data

def _zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


_ENTRY = st.text(st.sampled_from("ab./\\_-~:."), min_size=1, max_size=10)
_UPLOAD = st.one_of(st.binary(max_size=64), st.just(b"PNG"), st.lists(st.tuples(_ENTRY, st.sampled_from(
    [b"", b"x", b"a caption"])), max_size=4).map(_zip_bytes), st.lists(st.tuples(
        _ENTRY.map(lambda s: s + ".png"), st.just(b"PNG")), min_size=1, max_size=3).map(_zip_bytes))


@pytest.mark.filterwarnings("ignore:.*(skipped|upscaled).*:UserWarning")
@fuzz(40)
@given(st.lists(st.tuples(_STEM, st.sampled_from([b".png", b".zip", b".txt", b".jpg", b""]), _UPLOAD), min_size=1,
                max_size=4))
def test_training_uploads_any_files(tmp_path_factory, uploads):
    """The Training tab's upload (engine.stage_training_data): files of any name and bytes, zips of any entries.
    Everything staged stays inside the new folder; what is refused or skipped is said in one line; the images
    found are the ones that are images."""
    from sd_demo.train.staging import stage

    src, dest = tmp_path_factory.mktemp("up"), tmp_path_factory.mktemp("staged") / "data"
    paths = []
    for i, (stem, suffix, data) in enumerate(uploads):
        folder = os.path.join(os.fsencode(src), str(i).encode())
        os.mkdir(folder)
        path = os.path.join(folder, stem + suffix)
        if os.path.basename(path) in (b".", b".."):
            continue
        with open(path, "wb") as f:
            f.write(_png_bytes() if data == b"PNG" else data)
        paths.append(os.fsdecode(path))
    staged = field_error(lambda: stage(paths, dest, public=True), ["data", "uploads on this public app are limited"])
    if staged is None:
        return
    inside = os.path.realpath(dest)
    assert all(os.path.realpath(os.path.join(root, n)).startswith(inside + os.sep)
               for root, dirs, files in os.walk(dest) for n in dirs + files)
    assert all(Image.open(p).size == (8, 8) for p in staged.images)
    assert "\n" not in staged.summary()


_FILE = st.one_of(st.sampled_from(["a.png", "b.png", "../a.png", "/a.png", "a.txt"]), ANY)


@fuzz(60)
@given(st.lists(st.one_of(st.tuples(_FILE, ANY).map(list), st.lists(ANY, max_size=3)), max_size=4))
def test_caption_table_any_rows(tmp_path_factory, table):
    """The caption table as the browser may send it (any JSON in any row): captions are written for the folder's
    own images only, read back as sent (whitespace collapsed), and nothing else escapes a one-line message."""
    from sd_demo.train.staging import inventory, write_captions
    from sd_demo.ui.train import _rows

    folder = tmp_path_factory.mktemp("captions")
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(_png_bytes())
    before = {p.name for p in folder.iterdir()}
    rows = field_error(lambda: _rows(table), ["captions"])
    staged = rows is not None and field_error(lambda: write_captions(folder, rows), ["captions"])
    if not staged:
        assert {p.name for p in folder.iterdir()} <= before | {"a.txt", "b.txt"}
        return
    sent = {r: " ".join((c or "").split()) for r, c in rows if r in ("a.png", "b.png")}
    assert {p.name for p in folder.iterdir()} == before | {f"{r[0]}.txt" for r in sent}
    assert {r: c for r, c in inventory(folder).rows if r in sent} == sent


# ---------------------------------------------------------------------------------------------- the CLI

class _Reached(Exception):
    """The command got past every check to the slow part (a model load, training)."""


def _flag_values(command: str):
    """Lists of argv pieces for the command's flags: a switch alone, else the flag and a value (one of its choices,
    a number as text, or any text)."""
    from sd_demo.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    text = st.one_of(_TRICKY, st.text(max_size=8), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
                     st.integers(min_value=-2**70, max_value=2**70).map(str), st.floats().map(str))
    pieces = []
    for a in sub._actions:
        flag = next((f for f in a.option_strings if f.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        if a.nargs == 0:
            pieces.append(st.just([flag]))
        else:
            values = st.one_of(st.sampled_from([str(c) for c in a.choices]), text) if a.choices else \
                st.one_of(st.integers(-2, 4096).map(str), st.floats(-1, 1e4).map(str), text) if a.type in (int, float) \
                else text
            pieces.append(values.map(lambda v, f=flag: [f, v]))
    return st.lists(st.one_of(pieces), max_size=5).map(lambda ps: [x for p in ps for x in p])


@fuzz(100)
@given(st.sampled_from(["generate", "train"]), st.data())
def test_cli_any_argv(tmp_path_factory, monkeypatch_module, command, data):
    """`python -m sd_demo generate|train` with any flags and values (lone surrogates are what a shell hands over
    for bytes that are not UTF-8): argparse's usage error, or one line "error: ..." and exit status 2, or the
    command reaches its slow part; never a traceback."""
    import contextlib

    from sd_demo.__main__ import main

    out = tmp_path_factory.mktemp("cli")
    argv = [command, "--out", str(out / ("x.png" if command == "generate" else "run"))]
    argv += ["--data", str(out)] if command == "train" else ["--prompt", "x"]
    argv += data.draw(_flag_values(command))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a usage line and the error
            assert exc.code == 2 and "usage:" in err.getvalue()
            return event("argparse")
        except _Reached:
            return event("reached")
    event("error line")
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())


@pytest.fixture(scope="module")
def monkeypatch_module():
    """The CLI stops where a model would load or training would start (the fuzz checks only what comes before)."""
    from sd_demo.engine import Engine
    from sd_demo.train import loop

    def reached(*args, **kwargs):
        raise _Reached

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "load", reached)
        mp.setattr(loop, "train", reached)
        yield mp
