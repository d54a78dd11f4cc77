"""Write and parse A1111's "parameters" infotext (the PNG text chunk).

Layout, as produced by A1111's ``create_infotext``::

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>   (omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x512

Lines are stripped on reading, and a line starting with "Negative prompt:" starts the negative prompt wherever it
is; when that would misread a prompt, the params line also carries ``Prompt: "..."`` and ``Negative prompt: "..."``
(A1111 reads those keys after the body, so they win there too).

Value typing rule (what makes ``parse_infotext(format_infotext(x)) == x``):

* write: ints as ``str(n)``; whole floats as ints (``7.0`` -> ``7``, A1111
  style); other floats as ``repr`` (shortest exact form); str as is. A value
  containing ``, : " \\r \\n``, with surrounding whitespace, or empty is
  written as a JSON string (A1111's ``quote()``; the last three triggers are
  ours, because A1111 would silently lose those values).
* read: quoted values are always str. An unquoted value becomes an int if
  it is an int's canonical spelling (``str(int(v)) == v``, so hashes like
  ``0123`` stay str), else a float if it is a finite float's ``repr``,
  else it stays str.

So ints and floats round-trip (whole floats come back as equal ints); a str
that spells a canonical number (e.g. ``"42"``) comes back as a number, and
``bool`` is written as ``True``/``False`` and comes back as str.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin
from PIL.PngImagePlugin import PngInfo

# A1111's re_param_code: key, then a JSON-quoted or a comma-free value.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# Keys we write must be read back by _PARAM_RE unchanged (we strip parsed keys).
_KEY_RE = re.compile(r"\w[\w \-/]*[\w\-/]")
_SIZE_RE = re.compile(r"\s*(\d+)\s*x\s*(\d+)\s*")
_NEG = "Negative prompt:"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str = ""
    params: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) from the "Size" param ("512x768"), if well formed."""
        m = _SIZE_RE.fullmatch(str(self.params.get("Size", "")))
        return (int(m[1]), int(m[2])) if m else None


def _quote(s: str) -> str:
    if not s or s != s.strip() or any(c in s for c in ',:"\r\n'):
        return json.dumps(s, ensure_ascii=False)
    return s


def _format_value(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _parse_value(v: str) -> str | int | float:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except ValueError:  # A1111's unquote: keep the raw text
            return v
    try:
        if str(n := int(v)) == v:
            return n
    except ValueError:
        pass
    try:
        f = float(v)
        if math.isfinite(f) and repr(f) == v:
            return f
    except ValueError:
        pass
    return v


def format_infotext(info: Infotext) -> str:
    pairs = []
    for k, v in info.params.items():
        if v is None:
            continue
        if not _KEY_RE.fullmatch(k) or k in _TEXT_KEYS:
            raise ValueError(f"infotext key not readable back by A1111: {k!r}")
        pairs.append(f"{k}: {_quote(_format_value(v))}")
    neg = f"\n{_NEG} {info.negative_prompt}" if info.negative_prompt else ""
    body = f"{info.prompt}{neg}"
    # A prompt line starting with "Negative prompt:" (or a negative repeating it) reads back split, in A1111 too.
    # Then the texts also go in the params line, JSON-quoted, under A1111's own result keys: its
    # parse_generation_parameters sets "Prompt" / "Negative prompt" from the body first, then from the params line,
    # so A1111 reads them right as well (as parse_infotext does).
    wanted = (_strip_lines(info.prompt), _strip_lines(info.negative_prompt))
    if _read_body(body.split("\n")) != wanted:
        if pairs:  # (with none, the two would not make the 3 pairs that A1111 reads as a params line)
            pairs += [f"{k}: {json.dumps(t, ensure_ascii=False)}"
                      for k, t in zip(_TEXT_KEYS, (info.prompt, info.negative_prompt))]
    return f"{body}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> Infotext:
    """Parse leniently, following A1111's ``parse_generation_parameters``."""
    *lines, last = text.strip().split("\n")
    pairs = _PARAM_RE.findall(last)
    if len(pairs) < 3:  # A1111's rule: otherwise the last line is prompt text
        lines.append(last)
        pairs = []
    params = {k.strip(): _parse_value(v) for k, v in pairs}
    prompt, negative = _read_body(lines)
    # The params line's "Prompt" / "Negative prompt" win over the body, as in A1111 (see format_infotext);
    # str() gives back the text of one that read as a number.
    prompt, negative = (str(params.pop(k)) if k in params else t for k, t in zip(_TEXT_KEYS, (prompt, negative)))
    return Infotext(prompt=prompt, negative_prompt=negative, params=params)


_TEXT_KEYS = ("Prompt", "Negative prompt")


def _read_body(lines: list[str]) -> tuple[str, str]:
    """(prompt, negative prompt) of the lines above the params line, by A1111's rule."""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()  # also drops the \r of Windows newlines
        # Checked on every line, like A1111 (a repeated marker is dropped too).
        if line.startswith(_NEG):
            in_negative = True
            line = line[len(_NEG):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip()


def _strip_lines(text: str) -> str:
    """What the body keeps of a text: every line and the whole stripped (as A1111 reads it)."""
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def _pnginfo(info: Infotext) -> PngInfo:
    pnginfo = PngInfo()
    # PIL picks tEXt, or iTXt when the text is not latin-1 (same as A1111).
    pnginfo.add_text("parameters", format_infotext(info))
    return pnginfo


def png_bytes(image: Image.Image, info: Infotext) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_pnginfo(info))
    return buf.getvalue()


def write_png(image: Image.Image, path, info: Infotext) -> None:
    """Save a PNG with the chunk, replacing ``path`` atomically.

    Readers (e.g. a gallery) never see a half-written file: we write a
    sibling temp file (same filesystem, so os.replace is atomic) and rename.
    """
    path = os.fspath(path)
    head, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open keeps umask-based permissions
            image.save(f, format="PNG", pnginfo=_pnginfo(info))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_png(path_or_image) -> Infotext | None:
    """Parse the "parameters" chunk of a PNG (path, file object or Image) without decoding its pixels."""
    if isinstance(path_or_image, Image.Image):
        return _read_image(path_or_image)
    if isinstance(path_or_image, (str, os.PathLike)):
        with open(path_or_image, "rb") as f:
            return _read_file(f)
    return _read_file(path_or_image)


def _read_image(im: Image.Image) -> Infotext | None:
    text = im.info.get("parameters")
    if text is None and hasattr(im, "text"):  # chunks placed after IDAT (loads the pixels: the caller has them)
        text = im.text.get("parameters")
    return parse_infotext(text) if isinstance(text, str) else None


def _read_file(f) -> Infotext | None:
    if f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE:
        text = _png_text(f).get("parameters")
    else:  # another format (WebP, JPEG, ...): what PIL reads from its header, pixels untouched
        f.seek(0)
        with Image.open(f) as im:
            text = im.info.get("parameters")
    return parse_infotext(text) if isinstance(text, str) else None


def _png_text(f) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, wherever they lie, read after the 8-byte signature.

    PIL's ``Image.text`` decodes the whole image to reach chunks after the pixel data (+550 MB for a 12000 px
    square), so we walk the chunks and seek past all others. PIL's own PngStream parses each text chunk, with its
    caps on decompressed size (zTXt/iTXt bombs) and on total text; chunks over that size are skipped unread.
    """
    png = PngImagePlugin.PngStream(f)
    while True:
        try:
            cid, pos, length = png.read()
        except (struct.error, SyntaxError):  # truncated or broken: keep what was read, as PIL does
            break
        if cid == b"IEND":
            break
        if cid in (b"tEXt", b"zTXt", b"iTXt") and length <= PngImagePlugin.MAX_TEXT_CHUNK:
            try:
                png.crc(cid, png.call(cid, pos, length))
            except (SyntaxError, zlib.error):  # one malformed chunk (a zTXt of unknown method) hid all the others
                f.seek(pos + length + 4)
        else:
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC, never read
    return png.im_text
