"""Training data: scan a folder / .zip of images + captions (what is usable, what is skipped and why).
Turning the examples into pixels, buckets and batches is ``batches.py``.

Captions, first found wins per image: metadata.jsonl (HF imagefolder) > sidecar ``<stem>.txt`` > instance prompt >
the trigger word alone.
A trigger word, when given, is prepended ("trigger, caption") to every caption that lacks it (kohya / DreamBooth
convention), so a LoRA learns to bind the concept to that word.

Sizes come from headers and the pixel cap is checked before any decode; then each image is decoded once (JPEG at
1/8 scale), so a file training could not read is skipped and named before the model loads.
"""
from __future__ import annotations

import json
import re
import shutil
import stat
import tempfile
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from PIL import Image

# Formats we let PIL try; restricting them keeps e.g. EPS (which runs Ghostscript) away from untrusted files.
# (MPO, the multi-picture JPEG of some cameras, is opened by the JPEG plugin.) Only those this PIL build has.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF") if f in Image.OPEN)
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA_FILE = "metadata.jsonl"
# metadata.jsonl caption columns we accept, in order of preference ("text" is the HF imagefolder default).
CAPTION_KEYS = ("text", "caption", "prompt", "captions", "description")
MAX_ZIP_BYTES = 8 * 2**30  # total uncompressed size: refuses zip bombs long before the disk fills
MAX_ZIP_ENTRIES = 100_000
# Characters of a caption kept: CLIP reads 77 tokens (about 300 characters), kohya's longest setting 225 tokens.
MAX_CAPTION = 1000
_LISTED = 5  # names shown in a one-line message before "and N more"
_EXIF_ORIENTATION = 0x0112


def _f(default, help: str, **kw):
    """A dataclass field whose help text sits next to its default (same style as TrainConfig)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "folder or .zip of images with .txt captions / metadata.jsonl, or images "
                                        "+ instance prompt"})
    resolution: int = _f(512, "training side in px; buckets keep about resolution² pixels per image")
    instance_prompt: str | None = _f(None, "caption for every image that has no .txt / metadata.jsonl caption")
    prompt_name: str = _f("an instance prompt or a trigger word", "what errors call the captions' fill-ins (the class "
                                                                    "stream: --class-prompt)")
    trigger: str | None = _f(None, "trigger word prepended ('trigger, caption') to every caption lacking it")
    center_crop: bool = _f(True, "centre crop after resizing to cover the target (False: random crop)")
    buckets: bool = _f(False, "aspect-ratio buckets (kohya style) instead of square crops")
    max_pixels: int = _f(64_000_000, "refuse images with more pixels than this (decompression-bomb guard)")

    def validate(self) -> "DataConfig":
        """Raise ValueError naming the field for anything a user must change; return self for chaining."""
        def bad(name: str, why: str):
            raise ValueError(f"{name}: {why}")

        if not self.path:
            bad("path", "missing; give a folder or .zip of training images")
        if int(self.resolution) < 64 or self.resolution % 8:
            bad("resolution", f"{self.resolution} px must be at least 64 and a multiple of 8")
        if self.buckets and self.resolution % 64:
            bad("resolution", f"{self.resolution} px must be a multiple of 64 with buckets (e.g. 512, 768, 1024)")
        if int(self.max_pixels) <= 0:
            bad("max_pixels", f"{self.max_pixels} must be > 0")
        return self


class _TempDir:
    """Owns a zip's extraction dir: deleted once no report or example refers to it any more (or at exit).

    Examples hold it too, so keeping only ``report.examples`` never leaves paths to deleted files.
    """

    def __init__(self, path: Path):
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, path, True)

    def __getstate__(self) -> dict:
        # Copies (DataLoader workers, deepcopy) refer to the dir but never own it: only the original deletes it.
        return {"path": self.path, "_finalizer": None}

    def cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


@dataclass
class Example:
    path: Path
    caption: str  # its caption (for_training prepends the trigger), before dropout
    size: tuple[int, int]  # (width, height) after EXIF orientation
    name: str = ""  # relative to the data root, as messages show it
    _keep: _TempDir | None = field(default=None, repr=False, compare=False)  # keeps an extracted zip alive


@dataclass
class DatasetReport:
    examples: list[Example]
    skipped: list[tuple[str, str]]  # (file relative to the data root, why it was skipped)
    upscaled: list[str]  # files smaller than their training size: upscaled, so blurrier (for_training)
    source: str  # "folder" | "metadata.jsonl" | "instance prompt" | "trigger", prefixed "zip:<name>:" for a zip
    extract_dir: Path | None = None  # temp dir a zip was extracted into (see scan_dataset)
    _keep: _TempDir | None = field(default=None, repr=False, compare=False)

    def cleanup(self) -> None:
        """Delete the extracted zip now, e.g. once latents are cached (it goes anyway when unreferenced or at exit)."""
        if self._keep is not None:
            self._keep.cleanup()


class _Skip(Exception):
    """A file that is not usable training data; the message is the reason shown to the user."""


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


# ---------------------------------------------------------------- zip


def _check_zip_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"zip entry '{info.filename}' has an absolute path; refusing the zip (re-zip the folder)")
    if ".." in PurePosixPath(name).parts:
        raise ValueError(f"zip entry '{info.filename}' points outside the folder ('..'); refusing the zip")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ValueError(f"zip entry '{info.filename}' is a symlink; refusing the zip (zip the files themselves)")
    if info.flag_bits & 0x1:
        raise ValueError(f"zip entry '{info.filename}' is password-protected; zip the files without a password")


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract into the empty folder ``dest``, refusing (before writing anything) entries that could escape it.

    Hand-written rather than ZipFile.extractall because extractall silently rewrites bad names; we want the user
    to hear which entry is wrong.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_ENTRIES or sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
                raise ValueError(f"{zip_path.name}: more than {MAX_ZIP_ENTRIES} files or {MAX_ZIP_BYTES >> 30} GiB "
                                 "unpacked; use a folder instead")
            for info in infos:
                _check_zip_entry(info)
            root = dest.resolve()
            for info in infos:
                name = info.filename.replace("\\", "/")
                if info.is_dir() or name.startswith("__MACOSX/"):
                    continue
                target = (root / name).resolve()
                if not target.is_relative_to(root):  # belt and braces after _check_zip_entry
                    raise ValueError(f"zip entry '{info.filename}' points outside the folder; refusing the zip")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, NotImplementedError, EOFError) as e:
        raise ValueError(f"{zip_path.name} is not a readable zip ({e}); re-create it with a standard zip tool")
    except OSError as e:  # a file and a folder of the same name, disk full, ...
        raise ValueError(f"{zip_path.name} could not be extracted ({e}); unzip it yourself and pass the folder")


def _open_source(path: Path, extract_root: str | Path | None) -> tuple[Path, str, Path | None]:
    """(root folder to scan, source prefix, temp dir to delete later or None)."""
    if not path.exists():
        raise ValueError(f"data path '{path}' does not exist")
    if path.is_dir():
        return path, "", None
    if path.suffix.lower() != ".zip":
        raise ValueError(f"data path '{path}' is not a folder or a .zip file")
    # A fresh private dir per scan: extraction can never overwrite the user's files or another run's data.
    tmp = Path(tempfile.mkdtemp(prefix="sd_demo_data_", dir=extract_root))
    try:
        extract_zip(path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    root = tmp
    entries = [p for p in tmp.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():  # a zipped folder: scan inside it
        root = entries[0]
    return root, f"zip:{path.name}:", tmp


# ---------------------------------------------------------------- scanning


def _list_files(root: Path) -> list[Path]:
    # Hidden files and folders (.DS_Store, .ipynb_checkpoints) and macOS zip debris are never training data.
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(s.startswith(".") or s == "__MACOSX" for s in p.relative_to(root).parts))


def _probe_image(path: Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) after EXIF orientation; raises _Skip for non-images, corrupt files and oversized images."""
    try:
        with warnings.catch_warnings():
            # We apply our own pixel cap below; PIL's warning for >89 MP would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:  # checked from the header alone: nothing decoded yet
                    raise _Skip(f"{w}x{h} = {w * h / 1e6:.3g} MP is over the {max_pixels / 1e6:g} MP limit "
                                "(decompression-bomb guard); downscale it or raise max_pixels")
                swap = orientation(img) in (5, 6, 7, 8)
                _check_decodes(img)
    except Image.DecompressionBombError as e:
        raise _Skip(f"too large (decompression-bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise _Skip("not an image (or a format we do not read: use PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _Skip(f"corrupt or truncated image ({e})") from None
    return (h, w) if swap else (w, h)


def orientation(img: Image.Image) -> int | None:
    # PIL's PNG getexif() decodes the whole image when no eXIf chunk came before the pixels: ask only if one did.
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return img.getexif().get(_EXIF_ORIENTATION)


def _check_decodes(img: Image.Image) -> None:
    """Decode the pixels as training will, so a broken file is skipped and named here, not fatal after the model
    load (a PNG's CRCs can all be valid around a corrupt pixel stream: verify() passed it)."""
    if img.format in ("JPEG", "MPO"):  # a 1/8-scale draft decode reads every byte (catching truncation) cheaply
        img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
    img.load()  # the pixel cap above bounds this


def _read_metadata(root: Path) -> dict[Path, str | None]:
    """{resolved image path: caption or None} from metadata.jsonl; raises ValueError on malformed lines."""
    out, base = {}, root.resolve()
    text = (root / METADATA_FILE).read_text(encoding="utf-8-sig", errors="replace")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{METADATA_FILE} line {n}: not valid JSON ({e.msg}); fix or remove that line")
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise ValueError(f'{METADATA_FILE} line {n}: needs a "file_name" field naming an image')
        try:
            p = (base / row["file_name"]).resolve()
        except ValueError:  # a NUL or a lone surrogate (JSON escapes carry both): Python's message named no line
            raise ValueError(f"{METADATA_FILE} line {n}: file_name {row['file_name']!r} is not a file name") from None
        if not p.is_relative_to(base):
            raise ValueError(f"{METADATA_FILE} line {n}: file_name '{row['file_name']}' is outside the data folder")
        out[p] = _metadata_caption(row)
        if out[p] is not None and not _is_unicode(out[p]):  # the tokenizer failed on it mid-run, after the model load
            raise ValueError(f"{METADATA_FILE} line {n}: the caption holds a lone surrogate (a broken \\u escape)")
    return out


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_caption(row: dict) -> str | None:
    for key in CAPTION_KEYS:
        v = row.get(key)
        if isinstance(v, list) and v and isinstance(v[0], str):
            v = v[0]  # some datasets store several captions per image: take the first
        if isinstance(v, str):
            return v
    others = [v for k, v in row.items() if k != "file_name" and isinstance(v, str)]
    return others[0] if len(others) == 1 else None  # one unnamed text column: that is the caption


def _one_line(text: str | None) -> str:
    """Newlines and runs of spaces collapsed; only the first characters are looked at, so a 10 MB caption costs
    nothing (it cost gigabytes in the tokenizer and flooded the log)."""
    return " ".join((text or "")[:MAX_CAPTION * 4].split())


def _clean(caption: str | None) -> str:
    return _one_line(caption)[:MAX_CAPTION]


def _read_caption(path: Path) -> str:
    """A caption file's text, read no further than any caption could use."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            return f.read(MAX_CAPTION * 4)
    except UnicodeDecodeError:
        raise ValueError(f"caption file '{path.name}' is not UTF-8 text; re-save it as UTF-8") from None


def trigger_pattern(trigger: str) -> re.Pattern:
    """``trigger`` as a whole word, case-insensitive (as CLIP is)."""
    return re.compile(rf"(?<!\w){re.escape(trigger.strip())}(?!\w)", re.IGNORECASE)


def add_trigger(caption: str, trigger: str | None) -> str:
    """Prepend ``trigger`` unless the caption already contains it as a word."""
    trigger = (trigger or "").strip()
    if not trigger or trigger_pattern(trigger).search(caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _words(caption: str) -> list[str]:
    return re.findall(r"[^\s,.;:!?\"'()\[\]{}]+", caption.lower())


def find_trigger(captions: list[str], one_token: Callable[[str], bool]) -> str | None:
    """The trigger of a dataset captioned without --trigger: the first word of the first caption that every
    caption has and the model's tokenizer does not hold as one token (a made-up word like 'zkring', the usual way
    to name a new concept), or None."""
    if not captions:
        return None
    common = set.intersection(*(set(_words(c)) for c in captions))
    return next((w for w in _words(captions[0]) if w in common and not w.isdigit() and not one_token(w)), None)


def _classify(root: Path, files: list[Path], max_pixels: int):
    """(images {path: size}, sidecar captions {image stem path: caption file}, skipped [(name, why)])."""
    images, captions, skipped = {}, {}, []
    for p in files:
        rel = p.relative_to(root).as_posix()
        if rel == METADATA_FILE:
            continue
        if p.suffix.lower() in CAPTION_SUFFIXES:
            captions[p.with_suffix("")] = p
            continue
        try:
            images[p] = _probe_image(p, max_pixels)
        except _Skip as e:
            skipped.append((rel, str(e)))
    return images, captions, skipped


def _caption_images(root: Path, images: dict, sidecars: dict, meta: dict, cfg: DataConfig):
    """(examples, files lacking a caption, source) with metadata > sidecar > instance prompt > the trigger word
    alone per image."""
    instance = _clean(cfg.instance_prompt)
    prompt = instance or _clean(cfg.trigger)
    examples, missing, cut, from_files = [], [], [], False
    for p, size in images.items():
        name = p.relative_to(root).as_posix()
        line = _own_caption(p, sidecars, meta)
        if len(line) > MAX_CAPTION:
            cut.append(name)
        caption = line[:MAX_CAPTION]
        from_files = from_files or bool(caption)
        caption = caption or prompt
        if not caption:
            missing.append(name)
        examples.append(Example(p, caption, size, name))
    if cut:
        warnings.warn(f"{len(cut)} caption(s) cut to {MAX_CAPTION} characters (the text encoder reads about 300): "
                      + _names(cut), stacklevel=3)
    source = METADATA_FILE if meta else ("folder" if from_files or not prompt else
                                         "instance prompt" if instance else "trigger")
    return examples, missing, source


def _own_caption(image: Path, sidecars: dict, meta: dict) -> str:
    """The image's caption on one line, uncut: its metadata.jsonl row, else its sidecar .txt, else ''."""
    side = sidecars.get(image.with_suffix(""))
    return _one_line(meta.get(image.resolve())) or (_one_line(_read_caption(side)) if side else "")


def _orphans(root: Path, meta: dict, files: list[Path], sidecars: dict) -> list[tuple[str, str]]:
    """Captions and metadata rows with no image: reported so a misnamed file does not silently vanish."""
    stems = {p.with_suffix("") for p in files if p.suffix.lower() not in CAPTION_SUFFIXES}
    out = [(c.relative_to(root).as_posix(), "caption file with no image of the same name")
           for stem, c in sidecars.items() if stem not in stems]
    base = root.resolve()
    out += [(p.relative_to(base).as_posix(), f"listed in {METADATA_FILE} but not found")
            for p in meta if not p.exists()]
    return out


def scan_dataset(cfg: DataConfig, *, extract_root: str | Path | None = None) -> DatasetReport:
    """Validate and list the training data (each image decoded once; JPEG at 1/8 scale); warn about skipped / upscaled
    files.

    A .zip is extracted into a fresh temp dir under ``extract_root`` (default: the system temp dir), deleted when
    neither the report nor any of its examples is referenced any more, at exit, or by ``report.cleanup()``.
    """
    return for_training(read_dataset(cfg, extract_root=extract_root), cfg)


def read_dataset(cfg: DataConfig, *, extract_root: str | Path | None = None) -> DatasetReport:
    """The images and their own captions, and what was skipped: what a run can know before its preset decides the
    trigger and the resolution (``for_training`` adds those). Warns about skipped files."""
    cfg.validate()
    root, prefix, tmp = _open_source(Path(cfg.path).expanduser(), extract_root)
    try:
        report = _scan_root(root, cfg)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written left behind
        raise
    report.source = prefix + report.source
    if tmp is not None:
        report.extract_dir, report._keep = tmp, _TempDir(tmp)
        for ex in report.examples:
            ex._keep = report._keep
    if report.skipped:
        warnings.warn(f"skipped {len(report.skipped)} file(s): "
                      + _names([f"{n} ({why})" for n, why in report.skipped]), stacklevel=2)
    return report


def for_training(report: DatasetReport, cfg: DataConfig) -> DatasetReport:
    """``report`` with cfg's trigger in every caption and the images smaller than their training size listed
    (warned about): the examples are changed in place, so a zip's files stay owned by the same report."""
    from .batches import assign_buckets  # the sizes images will train at, for the upscale warning

    examples = report.examples
    for ex in examples:
        ex.caption = add_trigger(ex.caption, cfg.trigger)
    res = cfg.resolution
    targets = assign_buckets([e.size for e in examples], res) if cfg.buckets else [(res, res)] * len(examples)
    report.upscaled = [e.name for e, (th, tw) in zip(examples, targets)
                       if max(tw / e.size[0], th / e.size[1]) > 1 + 1e-9]
    if report.upscaled:
        warnings.warn(f"{len(report.upscaled)} image(s) smaller than the training size will be upscaled (softer "
                      f"results; use larger images or a lower resolution): {_names(report.upscaled)}", stacklevel=2)
    return report


def list_images(root: Path, max_pixels: int = DataConfig.max_pixels) -> tuple[dict[Path, str], list[tuple[str, str]]]:
    """({image: its caption, '' when it has none}, skipped [(name, why)]): what a folder holds, captioned or not
    (the Training tab's caption table, before a trigger or instance prompt fills the gaps)."""
    files = _list_files(root)
    meta = _read_metadata(root) if (root / METADATA_FILE).is_file() else {}
    images, sidecars, skipped = _classify(root, files, max_pixels)
    captions = {}
    for p in images:  # an unreadable caption file leaves its image uncaptioned (the table can fill it), not refused
        try:
            captions[p] = _own_caption(p, sidecars, meta)[:MAX_CAPTION]
        except ValueError:  # (_read_caption's only refusal)
            captions[p] = ""
            skipped.append((sidecars[p.with_suffix("")].relative_to(root).as_posix(),
                            "not UTF-8 text: its image is left uncaptioned, type the caption in the table"))
    return captions, skipped + _orphans(root, meta, files, sidecars)


def _scan_root(root: Path, cfg: DataConfig) -> DatasetReport:
    files = _list_files(root)
    if not files:
        raise ValueError(f"data '{cfg.path}' is empty; add images (PNG, JPEG, WebP) with same-name .txt captions")
    meta = _read_metadata(root) if (root / METADATA_FILE).is_file() else {}
    images, sidecars, skipped = _classify(root, files, cfg.max_pixels)
    if not images:
        raise ValueError(f"no usable images in '{cfg.path}': " + _names([f"{n} ({why})" for n, why in skipped]))
    examples, missing, source = _caption_images(root, images, sidecars, meta, cfg)
    if missing:
        raise ValueError(f"{len(missing)} of {len(examples)} images have no caption ({_names(missing)}); add a .txt "
                         f"file with the same name next to each image, or pass {cfg.prompt_name}")
    skipped += _orphans(root, meta, files, sidecars)
    return DatasetReport(examples, skipped, [], source)
