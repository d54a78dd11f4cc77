"""The Training tab's dataset: uploaded files gathered into one folder, listed with their captions, and captions
edited in the table written back (sidecar .txt files, and metadata.jsonl when the data came with one)."""
from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .data import METADATA_FILE, extract_zip, list_images

# A public app that lets visitors train (--allow-training) takes at most this much per upload.
PUBLIC_MAX_FILES = 200
PUBLIC_MAX_BYTES = 200 * 2**20


@dataclass
class Staged:
    folder: Path
    rows: list[tuple[str, str]]  # (image path relative to the folder, caption or "")
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    @property
    def images(self) -> list[Path]:
        return [self.folder / rel for rel, _ in self.rows]

    def summary(self) -> str:
        line = f"{len(self.rows)} image(s)"
        missing = sum(1 for _, c in self.rows if not c)
        if missing:
            line += f", {missing} without a caption (the instance prompt or trigger fills them)"
        if self.skipped:
            line += "; skipped: " + "; ".join(f"{n} ({why})" for n, why in self.skipped)
        return line


def _unique(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def _unpacked_size(path: Path) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return path.stat().st_size  # extract_zip reports it as unreadable


def _check_limits(paths: list[Path]) -> None:
    sizes = [_unpacked_size(p) if p.suffix.lower() == ".zip" else p.stat().st_size for p in paths]
    if len(paths) > PUBLIC_MAX_FILES or sum(sizes) > PUBLIC_MAX_BYTES:
        raise ValueError(f"uploads on this public app are limited to {PUBLIC_MAX_FILES} files and "
                         f"{PUBLIC_MAX_BYTES >> 20} MB unpacked; upload fewer or smaller images")


def stage(paths: list[str], folder: Path, public: bool = False) -> Staged:
    """Copy uploaded images, caption files and zips (extracted safely, each into its own subfolder) into the new
    folder ``folder``. A bad zip is skipped with its reason; bad images are listed by ``inventory``."""
    sources = [Path(p) for p in paths]
    if public:
        _check_limits(sources)
    folder.mkdir(parents=True, exist_ok=False)
    skipped = []
    for src in sources:
        if src.suffix.lower() == ".zip":
            dest = _unique(folder / src.stem)
            dest.mkdir()
            try:
                extract_zip(src, dest)
            except ValueError as exc:
                shutil.rmtree(dest, ignore_errors=True)
                skipped.append((src.name, str(exc)))
        else:  # only the file's own name: nothing of the client's path reaches our disk
            shutil.copyfile(src, _unique(folder / src.name))
    return inventory(folder, skipped)


def inventory(folder: Path, skipped: list[tuple[str, str]] | None = None) -> Staged:
    captions, more = list_images(folder)
    rows = sorted((p.relative_to(folder).as_posix(), c) for p, c in captions.items())
    return Staged(folder, rows, list(skipped or []) + more)


def _caption(rel: str, cap) -> str:
    """A table cell as a one-line caption (None or empty: none)."""
    if cap is None:
        return ""
    if not isinstance(cap, str):
        raise ValueError(f"captions: the caption of '{rel}' must be text, not {type(cap).__name__}")
    try:
        cap.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON carries it, no file can hold it
        raise ValueError(f"captions: the caption of '{rel}' has a character that is not text; retype it") from None
    return " ".join(cap.split())


def write_captions(folder: Path, rows: list[tuple[str, str]]) -> Staged:
    """Write each row's caption beside its image (``name.txt``); rows naming no image of the folder are ignored.
    A metadata.jsonl takes precedence over sidecars when training reads the folder, so its rows are updated too."""
    known = {rel for rel, _ in inventory(folder).rows}
    edits = {rel: _caption(rel, cap) for rel, cap in rows if rel in known}
    for rel, cap in edits.items():
        (folder / rel).with_suffix(".txt").write_text(cap + "\n", encoding="utf-8")
    meta = folder / METADATA_FILE
    if meta.is_file():
        lines = []
        for line in meta.read_text(encoding="utf-8-sig").splitlines():
            row = json.loads(line) if line.strip() else None
            if isinstance(row, dict) and row.get("file_name") in edits:
                row["text"] = edits[row["file_name"]]
            lines.append(json.dumps(row) if row is not None else line)
        meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return inventory(folder)
