"""Images of your own: find the files `sources.images` names, and tell when they changed.

Entries are folders (searched recursively for image files), globs, or COCO
JSON files (their `images` list; `file_name` relative to the JSON's folder).
The scan is a stat per file, never a read: `mirage run` and `mirage status`
call it to decide whether the import stage is stale (DVC sees only the params).
Its digest holds modification times, so it is kept outside the table
(`.mirage/scans/`): inside, a fresh checkout or a re-render of the same
files changed the table's DVC hash and made every later stage stale.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mirage.data.params import ParamsError
from mirage.data.store import MANIFEST, atomic_write_json, read_manifest

SCAN = "sources.json"  # beside the import table's shards: the entries, how many files, the duplicates
SCANS = Path(".mirage") / "scans"  # under the project root: each import table's last scan digest
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


def scan_record(root: Path, table: str | Path) -> Path:
    """Where the scan of the import table at `table` is recorded: its path
    under the project root mirrored in SCANS (outside the root: a hash of it)."""
    table = Path(table).absolute()
    name = table.relative_to(root.absolute()) if table.is_relative_to(root.absolute()) else \
        Path(hashlib.sha256(str(table).encode()).hexdigest()[:16])
    return root / SCANS / name.with_name(name.name + ".json")


def record_scan(root: Path, table: str | Path, files: list[SourceFile]) -> None:
    """Record the scan the table at `table` was just made from, and which
    table that is (its manifest's keys digest)."""
    atomic_write_json(scan_record(root, table), {"digest": scan_digest(files), "keys": read_manifest(table).get("keys")})


def recorded_scan(root: Path, table: str | Path) -> str | None:
    """The scan digest of the files the import table at `table` was last
    made from, when this workspace made the table that is there now (None:
    no record, or the table was made elsewhere or checked out since)."""
    path = scan_record(root, table)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["digest"] if record.get("keys") == read_manifest(table).get("keys") else None


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
    makes it before the import stage runs.  A table this workspace did not
    make (pulled, checked out) is taken as it is, as DVC takes it, and the
    files as they are now are recorded as what it was made from: later
    changes to them are seen (`mirage pull` checks right after pulling)."""
    if not (Path(table) / MANIFEST).exists():
        return False  # never made: DVC runs the stage
    later = made_later(root, entries, produced)
    recorded = recorded_scan(root, table)
    if recorded is None:
        if not later:
            record_scan(root, table, find_files(entries, root))
        return False
    return later or recorded != scan_digest(find_files(entries, root))
