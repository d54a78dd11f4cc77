import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sd_demo.infotext import (
    _PARAM_RE,
    Infotext,
    format_infotext,
    parse_infotext,
    png_bytes,
    read_png,
    write_png,
)

EXAMPLE = Infotext(
    prompt="a red circle",
    negative_prompt="blurry",
    params={
        "Steps": 20,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7.0,
        "Seed": 42,
        "Size": "512x512",
        "Model": "runwayml/stable-diffusion-v1-5",
    },
)
EXAMPLE_TEXT = (
    "a red circle\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, "
    "Size: 512x512, Model: runwayml/stable-diffusion-v1-5"
)


def test_format_known_example():
    assert format_infotext(EXAMPLE) == EXAMPLE_TEXT


def test_parse_known_example():
    info = parse_infotext(EXAMPLE_TEXT)
    assert info == EXAMPLE
    assert type(info.params["CFG scale"]) is int and type(info.params["Steps"]) is int
    assert info.size == (512, 512)


def test_empty_negative_omits_line_and_none_values_are_dropped():
    info = Infotext("cat", "", {"Steps": 20, "Seed": 1, "Clip skip": None, "CFG scale": 7.5})
    assert format_infotext(info) == "cat\nSteps: 20, Seed: 1, CFG scale: 7.5"


def test_quoting_and_round_trip():
    info = Infotext("p", params={"Steps": 4, "Seed": 5, "Lora hashes": 'a: 1, b: 2\n"x"'})
    text = format_infotext(info)
    assert text.endswith(r'Lora hashes: "a: 1, b: 2\n\"x\""')
    assert "\n" not in text.split("\n", 1)[1]  # params stay on one line
    assert parse_infotext(text) == info


def test_multiline_prompt_and_negative_round_trip():
    info = Infotext(
        "line one,\nline: two\n\nline four",
        "bad,\nworse\nworst",
        {"Steps": 30, "Sampler": "Euler a", "Seed": -1},
    )
    text = format_infotext(info)
    assert text == (
        "line one,\nline: two\n\nline four\nNegative prompt: bad,\nworse\nworst\n"
        "Steps: 30, Sampler: Euler a, Seed: -1"
    )
    assert parse_infotext(text) == info


def test_parse_real_a1111_infotext():
    text = (
        "masterpiece, best quality, (1girl:1.2), <lora:detail:0.8>\n"
        "looking at viewer\n"
        "Negative prompt: lowres, bad anatomy,\n"
        "worst quality\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, "
        "Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
        'Lora hashes: "name: abc123", Version: v1.10.1'
    )
    info = parse_infotext(text)
    assert info.prompt == (
        "masterpiece, best quality, (1girl:1.2), <lora:detail:0.8>\nlooking at viewer"
    )
    assert info.negative_prompt == "lowres, bad anatomy,\nworst quality"
    assert info.params == {
        "Steps": 28,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7.5,
        "Seed": 1234567890,
        "Size": "512x768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": 0.45,
        "Clip skip": 2,
        "Lora hashes": "name: abc123",
        "Version": "v1.10.1",
    }
    assert list(info.params)[:3] == ["Steps", "Sampler", "Schedule type"]
    assert info.size == (512, 768)
    assert format_infotext(info) == text  # A1111's own output is reproduced


def test_parse_lenient_inputs():
    # Fewer than 3 pairs on the last line: A1111 treats it as prompt text.
    assert parse_infotext("a cat\nstyle: oil, mood: calm") == Infotext(
        "a cat\nstyle: oil, mood: calm"
    )
    assert parse_infotext("") == Infotext("")
    assert parse_infotext("  just a prompt  \n") == Infotext("just a prompt")
    # Windows newlines, trailing whitespace, empty prompt.
    crlf = "a dog  \r\nNegative prompt: ugly \r\nSteps: 1, Seed: 2, Sampler: Euler \r\n"
    assert parse_infotext(crlf) == Infotext("a dog", "ugly", {"Steps": 1, "Seed": 2, "Sampler": "Euler"})
    assert parse_infotext("Negative prompt: x\nSteps: 1, Seed: 2, Size: 64x32") == Infotext(
        "", "x", {"Steps": 1, "Seed": 2, "Size": "64x32"}
    )
    # Hash-like digits are not canonical ints; escaped quotes are unquoted.
    info = parse_infotext(r'p' + '\n' + r'Steps: 1, Model hash: 0123, TI: "say \"hi\", ok"')
    assert info.params == {"Steps": 1, "Model hash": "0123", "TI": 'say "hi", ok'}


def test_a_prompt_line_starting_with_the_negative_marker_reads_back_whole():
    """By A1111's rule such a line starts the negative prompt; the exact texts then also go in the params line under
    A1111's own result keys, which its parser (and ours) apply after the body."""
    info = Infotext("a cat\nNegative prompt: on a mat", "dogs", {"Steps": 20, "Seed": 1, "Size": "64x64"})
    text = format_infotext(info)
    assert text == ('a cat\nNegative prompt: on a mat\nNegative prompt: dogs\nSteps: 20, Seed: 1, Size: 64x64, '
                    'Prompt: "a cat\\nNegative prompt: on a mat", Negative prompt: "dogs"')
    assert parse_infotext(text) == info
    plain = Infotext("a cat", "dogs", {"Steps": 20, "Seed": 1, "Size": "64x64"})
    assert "Prompt:" not in format_infotext(plain).split("\n")[-1]  # only where the body would be misread
    with pytest.raises(ValueError):
        format_infotext(Infotext("x", params={"Prompt": "y", "Steps": 1, "Seed": 2}))


def test_size_helper_and_bad_key():
    assert Infotext("x").size is None
    assert Infotext("x", params={"Size": "oops"}).size is None
    with pytest.raises(ValueError):
        format_infotext(Infotext("x", params={"bad:key": 1}))


# --- property test -----------------------------------------------------------

_chars = st.one_of(
    st.sampled_from(list(',:"\\\n\r\t ()<>')),
    st.characters(blacklist_categories=("Cs",)),  # surrogates can't be UTF-8 encoded
)


def _normalize(s: str) -> str:
    # A1111 strips every line and the whole text, so only such text can round-trip.
    return "\n".join(line.strip() for line in s.split("\n")).strip()


def _unambiguous(s: str) -> bool:
    # A line starting with "Negative prompt:" or holding >= 3 "key: value" pairs
    # is read by A1111 as the negative-prompt marker / the params line no
    # matter where it came from, so no format can round-trip such prompts.
    return all(
        not line.startswith("Negative prompt:") and len(_PARAM_RE.findall(line)) < 3
        for line in s.split("\n")
    )


_prompts = st.text(_chars, max_size=80).map(_normalize).filter(_unambiguous)


def _spells_number(s: str) -> bool:
    # Documented rule: unquoted canonical int/float spellings are read as numbers.
    try:
        return str(int(s)) == s
    except ValueError:
        pass
    try:
        return repr(float(s)) == s and float(s) not in (float("inf"), float("-inf"))
    except ValueError:
        return False


_values = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_chars, max_size=30).filter(lambda s: not _spells_number(s)),
)
_keys = st.from_regex(r"\w[\w \-/]{0,15}[\w\-/]", fullmatch=True)
# A params line needs >= 3 pairs to be recognised (A1111's rule), so 0 or >= 3.
_params = st.one_of(st.just({}), st.dictionaries(_keys, _values, min_size=3, max_size=8))


@settings(max_examples=300, deadline=None)
@given(_prompts, _prompts, _params)
def test_round_trip_property(prompt, negative, params):
    info = Infotext(prompt, negative, params)
    back = parse_infotext(format_infotext(info))
    assert back == info
    assert list(back.params) == list(params)  # order preserved
    for k, v in params.items():
        if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
            assert type(back.params[k]) is int
        else:
            assert type(back.params[k]) is type(v)


# --- PNG ---------------------------------------------------------------------


def test_png_round_trip(tmp_path):
    img = Image.new("RGB", (16, 8), (255, 0, 0))
    info = Infotext("ünïcode prompt, 猫", "blurry\nugly", dict(EXAMPLE.params))
    path = tmp_path / "out.png"
    path.write_bytes(b"old content")  # overwritten in place
    write_png(img, path, info)
    assert os.listdir(tmp_path) == ["out.png"]  # no temp file left behind
    assert read_png(path) == info
    assert read_png(str(path)) == info
    with Image.open(path) as im:
        assert im.size == (16, 8)
        assert read_png(im) == info
        assert im.info["parameters"] == format_infotext(info)


def test_png_bytes_round_trip():
    data = png_bytes(Image.new("L", (4, 4)), EXAMPLE)
    assert data.startswith(b"\x89PNG")
    assert read_png(io.BytesIO(data)) == EXAMPLE


def test_read_png_without_chunk(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_png(path) is None


def _chunk(cid: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))


def _big_png_with_text_after_pixels(path, side: int, text: str) -> None:
    """A side x side greyscale PNG whose "parameters" chunk follows IDAT, written row by row (cheap to make)."""
    import struct
    import zlib

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one black row
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)))
        f.write(_chunk(b"IDAT", idat) + _chunk(b"tEXt", b"parameters\0" + text.encode("latin-1")))
        f.write(_chunk(b"IEND", b""))


def test_read_png_reads_text_after_pixels_without_decoding_them(tmp_path):
    """A 12000 px square (144 MB of pixels) with its text after IDAT: read in a fresh process, whose peak memory
    must not grow by the pixels (PIL's Image.text decodes them all to reach that chunk)."""
    import subprocess
    import sys

    path = tmp_path / "big.png"
    _big_png_with_text_after_pixels(path, 12000, EXAMPLE_TEXT)
    script = (
        "import resource, sys; from sd_demo.infotext import read_png\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "info = read_png(sys.argv[1])\n"
        "print(info.params['Seed'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed, grown_kib = map(int, out.stdout.split())
    assert seed == 42 and grown_kib < 20_000


def test_read_png_skips_oversized_and_broken_text_chunks(tmp_path):
    """A zTXt bomb is refused by PIL's cap, an oversized tEXt is skipped unread, a malformed one is skipped, a
    truncated tail keeps what came before it."""
    import struct
    import zlib

    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    params = _chunk(b"tEXt", b"parameters\0" + EXAMPLE_TEXT.encode())
    huge = _chunk(b"tEXt", b"comment\0" + bytes(2 << 20))
    (tmp_path / "huge.png").write_bytes(head + huge + params + _chunk(b"IEND", b""))
    assert read_png(tmp_path / "huge.png") == EXAMPLE
    (tmp_path / "cut.png").write_bytes(head + params + _chunk(b"IDAT", b"x")[:-3])
    assert read_png(tmp_path / "cut.png") == EXAMPLE
    for broken in (b"comment\0\x07abc", b"comment\0\0not zlib", b"comment"):  # unknown method, bad stream, no NUL
        (tmp_path / "broken.png").write_bytes(head + _chunk(b"zTXt", broken) + params + _chunk(b"IEND", b""))
        assert read_png(tmp_path / "broken.png") == EXAMPLE
    bomb = _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(bytes(64 << 20)))
    (tmp_path / "bomb.png").write_bytes(head + bomb + _chunk(b"IEND", b""))
    with pytest.raises(ValueError):
        read_png(tmp_path / "bomb.png")
