"""Training data: scan a folder / .zip of images + captions, aspect-ratio buckets, image loading, the dataset.

Size conventions (the two worlds meet here): ``Example.size`` and ``load_example``'s ``target`` are (width, height)
as PIL reports and takes them; buckets (``assign_buckets``, ``bucket_resolutions``, ``TrainDataset.bucket``) are
(height, width) as tensors are laid out: an image of bucket (h, w) becomes ``pixel_values`` of shape (3, h, w).

Captions, first found wins per image: metadata.jsonl (HF imagefolder) > sidecar ``<stem>.txt`` > instance prompt.
A trigger word, when given, is prepended ("trigger, caption") to every caption that lacks it (kohya / DreamBooth
convention), so a LoRA learns to bind the concept to that word.

Nothing is decoded in full while scanning: sizes come from headers and the pixel cap is checked before any decode.
Randomness (dropout, flips, random crops, batch order) is derived from (seed, epoch, index) so a resumed run draws
exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import stat
import tempfile
import warnings
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

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
    prompt_name: str = _f("an instance prompt", "what errors call instance_prompt (the class stream: --class-prompt)")
    trigger: str | None = _f(None, "trigger word prepended ('trigger, caption') to every caption lacking it")
    center_crop: bool = _f(True, "centre crop after resizing to cover the target (False: random crop)")
    random_flip: bool = _f(False, "horizontal flip with probability 0.5 (avoid for text or asymmetric subjects)")
    caption_dropout: float = _f(0.0, "probability of an empty caption (trains the unconditional branch for CFG)")
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
        if not 0 <= self.caption_dropout < 1:
            bad("caption_dropout", f"{self.caption_dropout} must be in [0, 1)")
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
    caption: str  # final caption: trigger already prepended, before dropout
    size: tuple[int, int]  # (width, height) after EXIF orientation
    _keep: _TempDir | None = field(default=None, repr=False, compare=False)  # keeps an extracted zip alive


@dataclass
class DatasetReport:
    examples: list[Example]
    skipped: list[tuple[str, str]]  # (file relative to the data root, why it was skipped)
    upscaled: list[str]  # files smaller than their training size: upscaled, so blurrier
    source: str  # "folder" | "metadata.jsonl" | "instance prompt", prefixed "zip:<name>:" for a zip
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
                swap = _orientation(img) in (5, 6, 7, 8)
                _check_decodes(img)
    except Image.DecompressionBombError as e:
        raise _Skip(f"too large (decompression-bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise _Skip("not an image (or a format we do not read: use PNG, JPEG or WebP)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _Skip(f"corrupt or truncated image ({e})") from None
    return (h, w) if swap else (w, h)


def _orientation(img: Image.Image) -> int | None:
    # PIL's PNG getexif() decodes the whole image when no eXIf chunk came before the pixels: ask only if one did.
    if img.format == "PNG" and "exif" not in img.info:
        return None
    return img.getexif().get(_EXIF_ORIENTATION)


def _check_decodes(img: Image.Image) -> None:
    if img.format in ("JPEG", "MPO"):
        # verify() is a no-op for JPEG; a 1/8-scale draft decode reads every byte (catching truncation) cheaply.
        img.draft(None, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    elif img.format == "PNG":
        img.verify()  # walks every chunk and its CRC without inflating the pixels
    else:
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
        p = (base / row["file_name"]).resolve()
        if not p.is_relative_to(base):
            raise ValueError(f"{METADATA_FILE} line {n}: file_name '{row['file_name']}' is outside the data folder")
        out[p] = _metadata_caption(row)
    return out


def _metadata_caption(row: dict) -> str | None:
    for key in CAPTION_KEYS:
        v = row.get(key)
        if isinstance(v, list) and v and isinstance(v[0], str):
            v = v[0]  # some datasets store several captions per image: take the first
        if isinstance(v, str):
            return v
    others = [v for k, v in row.items() if k != "file_name" and isinstance(v, str)]
    return others[0] if len(others) == 1 else None  # one unnamed text column: that is the caption


def _clean(caption: str | None) -> str:
    return " ".join((caption or "").split())  # one line: newlines and runs of spaces collapse


def _read_caption(path: Path) -> str:
    try:
        return _clean(path.read_text(encoding="utf-8-sig"))
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
    """(examples, files lacking a caption, source) with metadata > sidecar > instance prompt per image."""
    prompt = _clean(cfg.instance_prompt)
    examples, missing, from_files = [], [], False
    for p, size in images.items():
        side = sidecars.get(p.with_suffix(""))
        caption = _clean(meta.get(p.resolve())) or (_read_caption(side) if side else "")
        from_files = from_files or bool(caption)
        caption = caption or prompt
        if not caption:
            missing.append(p.relative_to(root).as_posix())
        examples.append(Example(p, add_trigger(caption, cfg.trigger), size))
    source = METADATA_FILE if meta else ("folder" if from_files or not prompt else "instance prompt")
    return examples, missing, source


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
    """Validate and list the training data (headers only, no full decode); warn about skipped / upscaled files.

    A .zip is extracted into a fresh temp dir under ``extract_root`` (default: the system temp dir), deleted when
    neither the report nor any of its examples is referenced any more, at exit, or by ``report.cleanup()``.
    """
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
    captions = {p: _clean(meta.get(p.resolve())) or (_read_caption(sidecars[p.with_suffix("")])
                                                     if p.with_suffix("") in sidecars else "") for p in images}
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
    res = cfg.resolution
    targets = assign_buckets([e.size for e in examples], res) if cfg.buckets else [(res, res)] * len(examples)
    upscaled = [e.path.relative_to(root).as_posix() for e, (th, tw) in zip(examples, targets)
                if max(tw / e.size[0], th / e.size[1]) > 1 + 1e-9]
    return DatasetReport(examples, skipped, upscaled, source)


# ---------------------------------------------------------------- buckets


def bucket_resolutions(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) buckets, sides multiples of ``step``, area <= resolution² (kohya's rule: memory per batch
    never exceeds the square case), aspect ratio <= ``max_ratio``; sorted from tallest to widest."""
    area, out = resolution * resolution, set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step  # the tallest height that keeps w * h <= area
        if h >= step and max(w, h) / min(w, h) <= max_ratio + 1e-9:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw[0] * hw[1]))


def assign_buckets(sizes: list[tuple[int, int]], resolution: int) -> list[tuple[int, int]]:
    """(height, width) bucket per (width, height) size: the nearest aspect ratio in log space, larger area on ties."""
    buckets = bucket_resolutions(resolution)
    logs = [math.log(w / h) for h, w in buckets]

    def nearest(size: tuple[int, int]) -> tuple[int, int]:
        r = math.log(size[0] / size[1])
        j = min(range(len(buckets)), key=lambda k: (round(abs(logs[k] - r), 9), -buckets[k][0] * buckets[k][1]))
        return buckets[j]

    return [nearest(s) for s in sizes]


# ---------------------------------------------------------------- loading


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: scale to 8 bits, not clip to white
        img = img.convert("I").point(lambda v: v / 257).convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # On white, not black: transparent PNGs (logos, cut-outs) are meant to be seen on a light page.
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(size: tuple[int, int], target: tuple[int, int], center: bool, rng: np.random.Generator
             ) -> tuple[tuple[int, int], int, int]:
    """((resized w, h), left, top): an image of ``size`` resized to cover ``target``, then cut at (left, top).
    Computed from the full-size dimensions, so a JPEG decoded in draft mode is cut exactly the same."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if center:
        return (nw, nh), (nw - tw) // 2, (nh - th) // 2
    return (nw, nh), int(rng.integers(0, nw - tw + 1)), int(rng.integers(0, nh - th + 1))


def _crop_rng(ex: Example) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(ex.path.name.encode()))


def micro_conditioning(ex: Example, target: tuple[int, int], *, center_crop: bool = True, flip: bool = False
                       ) -> tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning for ``ex`` cut to ``target`` as ``load_example`` cuts it (seeded crop): (original
    height, width, crop top, crop left, target height, width). A flipped image's crop is measured from the other
    side, as in the diffusers SDXL training example."""
    (nw, _), left, top = crop_box(ex.size, target, center_crop, _crop_rng(ex))
    if flip:
        left = nw - target[0] - left
    return ex.size[1], ex.size[0], top, left, target[1], target[0]


def load_example(ex: Example, target: tuple[int, int], *, center_crop: bool = True, flip: bool = False,
                 rng: np.random.Generator | None = None) -> Image.Image:
    """RGB image of exactly ``target`` = (width, height): EXIF-oriented, alpha on white, resized to cover, cropped.

    ``flip`` applies a horizontal flip (the caller decides, so the decision can be seeded). Without ``rng`` a random
    crop uses a generator seeded from the file name, so reruns and resumes crop identically.
    """
    tw, th = target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # scan_dataset applied max_pixels
        with Image.open(ex.path, formats=IMAGE_FORMATS) as img:
            sw, sh = img.size
            if _orientation(img) in (5, 6, 7, 8):
                sw, sh = sh, sw
            scale = max(tw / sw, th / sh)
            # JPEG only: decode at 1/2..1/8 scale when that still covers the target (big photos load ~10x faster).
            draft = (math.ceil(img.width * scale), math.ceil(img.height * scale))
            img.draft(None, draft)
            img = _to_rgb(ImageOps.exif_transpose(img))
    (nw, nh), left, top = crop_box((sw, sh), target, center_crop, _crop_rng(ex) if rng is None else rng)
    if img.size != (nw, nh):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    img = img.crop((left, top, left + tw, top + th))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range the SD VAE encoder expects."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


# ---------------------------------------------------------------- dataset and sampler


class TrainDataset(torch.utils.data.Dataset):
    """Examples of a scanned report as dicts: pixel_values (3, h, w) in [-1, 1], caption (after dropout),
    bucket (h, w), index. All randomness of item i comes from default_rng((seed, epoch, i))."""

    def __init__(self, report: DatasetReport, cfg: DataConfig, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed: {seed} must be >= 0")
        self.report, self.cfg, self.seed, self.epoch = report, cfg, int(seed), 0  # report keeps a zip's files alive
        self.examples = report.examples
        res = cfg.resolution
        self.buckets = (assign_buckets([e.size for e in self.examples], res) if cfg.buckets
                        else [(res, res)] * len(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    def bucket(self, i: int) -> tuple[int, int]:
        return self.buckets[i]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _draws(self, i: int) -> tuple[bool, bool, np.random.Generator]:
        # Fixed draw order (dropout, flip, then crop offsets) so enabling one option never shifts another's draws.
        rng = np.random.default_rng((self.seed, self.epoch, i))
        u_drop, u_flip = rng.random(2)
        return u_drop < self.cfg.caption_dropout, self.cfg.random_flip and u_flip < 0.5, rng

    def caption(self, i: int) -> str:
        """Caption of item i this epoch, after dropout (no image is loaded)."""
        return "" if self._draws(i)[0] else self.examples[i].caption

    def __getitem__(self, i: int) -> dict:
        drop, flip, rng = self._draws(i)
        h, w = self.buckets[i]
        img = load_example(self.examples[i], (w, h), center_crop=self.cfg.center_crop, flip=flip, rng=rng)
        return {"pixel_values": to_tensor(img), "caption": "" if drop else self.examples[i].caption,
                "bucket": (h, w), "index": i}


def collate(items: list[dict]) -> dict:
    """DataLoader collate_fn for single-bucket batches: pixel_values (B, 3, h, w), captions, bucket, indices."""
    buckets = {it["bucket"] for it in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; use BucketBatchSampler as the batch_sampler")
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "captions": [it["caption"] for it in items], "bucket": items[0]["bucket"],
            "indices": [it["index"] for it in items]}


class BucketBatchSampler:
    """Index batches, each from one bucket; order from default_rng((seed, epoch)); resumable mid-epoch.

    ``position`` counts batches handed out. With DataLoader workers that prefetch, save the number of batches
    actually trained instead: {"epoch": e, "position": n} is all ``load_state_dict`` needs besides the checks.
    Iterating after an epoch is used up starts the next one; ``set_epoch`` to the current epoch keeps the position
    (so "set_epoch at the top of every epoch" and resume work together).
    """

    def __init__(self, dataset, batch_size: int, seed: int, drop_last: bool = False):
        if int(batch_size) < 1 or int(seed) < 0:
            raise ValueError(f"batch size {batch_size} must be >= 1 and seed {seed} >= 0")
        self.dataset, self.batch_size, self.seed, self.drop_last = dataset, int(batch_size), int(seed), drop_last
        self._groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(dataset)):
            self._groups.setdefault(tuple(dataset.bucket(i)), []).append(i)
        self.epoch, self.position = 0, 0
        if len(self) == 0:
            raise ValueError(f"batch size {batch_size} is larger than every bucket and drop_last is set; "
                             "lower the batch size or turn buckets off")

    def __len__(self) -> int:
        full = sum(len(g) // self.batch_size for g in self._groups.values())
        return full if self.drop_last else full + sum(bool(len(g) % self.batch_size) for g in self._groups.values())

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in order (pure function of seed, epoch, batch size and the buckets)."""
        rng = np.random.default_rng((self.seed, int(epoch)))
        out = []
        for key in sorted(self._groups):  # sorted: dict order must not leak into the draws
            group = self._groups[key]
            shuffled = [group[j] for j in rng.permutation(len(group))]
            for k in range(0, len(shuffled), self.batch_size):
                chunk = shuffled[k:k + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        return [out[j] for j in rng.permutation(len(out))]

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)  # keep dropout / flips in step with the batch order

    def __iter__(self):
        if self.position >= len(self):
            self.set_epoch(self.epoch + 1)
        batches = self.batches(self.epoch)
        for k in range(self.position, len(batches)):
            self.position = k + 1  # counted before the hand-out: a checkpoint taken after this batch skips it
            yield list(batches[k])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, now in (("seed", self.seed), ("batch_size", self.batch_size), ("num_examples", len(self.dataset))):
            if key in state and state[key] != now:
                raise ValueError(f"resume: the checkpoint's {key} is {state[key]}, this run has {now}; resume with "
                                 "the same data, seed and batch size (or start a new run)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
