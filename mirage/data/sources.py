"""Images of your own: find the files `sources.images` names, and tell when they changed.

Entries are folders (searched recursively for image files), globs, or COCO
JSON files (their `images` list; `file_name` relative to the JSON's folder).
The scan is a stat per file, never a read: `mirage run` and `mirage status`
call it to decide whether the import stage is stale (DVC sees only the params).
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mirage.data.params import ParamsError

SCAN = "sources.json"  # beside the import table's shards: the files found and their scan digest
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class SourceFile:
    path: Path   # absolute
    name: str    # as recorded: relative to the project root when inside it


def find_files(entries: tuple[str, ...], root: Path) -> list[SourceFile]:
    """Every file the entries name, each once, in entry order then path order.
    An entry that names nothing is a ParamsError naming it."""
    seen: set[Path] = set()
    out: list[SourceFile] = []
    for i, entry in enumerate(entries):
        where = f"sources.images[{i}] {entry!r}"
        path = root / entry
        if glob.has_magic(entry):
            found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        elif path.is_file() and path.suffix.lower() == ".json":
            found = coco_images(path, where)
        elif path.is_file():
            found = [path]
        else:
            raise ParamsError(f"{where}: no such file or folder")
        if not found:
            raise ParamsError(f"{where}: names no image file")
        for p in found:
            p = Path(p).absolute()
            if p not in seen:
                seen.add(p)
                out.append(SourceFile(p, str(p.relative_to(root)) if p.is_relative_to(root) else str(p)))
    return out


def coco_images(path: Path, where: str) -> list[Path]:
    try:
        images = json.loads(path.read_text())["images"]
        return [path.parent / im["file_name"] for im in images]
    except (ValueError, KeyError, TypeError) as err:
        raise ParamsError(f"{where}: not a COCO JSON file with an images list ({type(err).__name__}: {err})") from None


def scan_digest(files: list[SourceFile]) -> str:
    """What says the files may have changed, without reading them: names,
    sizes and modification times (what DVC's own stat cache trusts)."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = f.path.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f.name}\0missing\n".encode())
    return h.hexdigest()[:16]


def recorded_scan(table: str | Path) -> str | None:
    """The scan digest of the files the import table was last made from (None: never made)."""
    path = Path(table) / SCAN
    return json.loads(path.read_text())["digest"] if path.exists() else None


def check_entries(root: Path, entries: tuple[str, ...], produced: tuple[Path, ...] = ()) -> None:
    """Refuse entries that name nothing (a ParamsError naming the entry), as
    the import stage would, but before anything is written: an entry inside
    one of the `produced` paths that is not there yet is made by the
    pipeline first, and is checked when the import stage runs."""
    later = made_later(root, entries, produced)
    find_files(tuple(e for e in entries if e not in later), root)


def made_later(root: Path, entries: tuple[str, ...], produced: tuple[Path, ...]) -> list[str]:
    """The entries not there yet that lie inside one of the `produced` paths
    (another stage's output): the pipeline makes them before the import stage."""
    return [e for e in entries if not glob.has_magic(e) and not (root / e).exists()
            and any((root / e).absolute().is_relative_to(Path(p).absolute()) for p in produced)]


def sources_changed(root: Path, entries: tuple[str, ...], table: str | Path, produced: tuple[Path, ...] = ()) -> bool:
    """Whether the files `entries` name differ (names, sizes, times) from
    those the import table at `table` was made from.  An entry inside one of
    the `produced` paths (another stage's output, as toyworld's unlabeled
    scenes) that is not there yet is a change, not an error: the pipeline
    makes it before the import stage runs."""
    recorded = recorded_scan(table)
    if recorded is None:
        return False
    if made_later(root, entries, produced):
        return True
    return recorded != scan_digest(find_files(entries, root))
