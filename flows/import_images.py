"""Stage import: your own images (`sources.images`) into an images table.

The table has the generated images' columns (so discover and train_detector
read both alike) plus where each image came from: provenance `imported`, the
original path, its size before any resizing.  An item's key is its content
hash: a new file is one new item, a changed file recomputes that item only, a
file with the bytes of another is a duplicate (kept once).  Files that cannot
be read are listed in the table's errors.parquet and retried next run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.images import encode_png
from mirage.params import Sources
from mirage.stage import command, parse, progress, report_errors
from mirage.store import ERRORS, Partial, ShardStore, atomic_write_json, item_key
from tasks.sources import SCAN, SourceFile, content_hash, find_files, read_image, scan_digest

VERSION = 1


def import_batch(cfg: Sources, specs: list[dict]) -> pa.Table | Partial:
    rows, errors = [], {}
    for s in specs:
        try:
            data = Path(s["path"]).read_bytes()
            if content_hash(data) != s["sha256"]:
                raise OSError("the file changed while importing: run again")
            image, (ow, oh) = read_image(data, cfg.max_size)
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            why = "not an image format PIL reads, or corrupt" if type(err).__name__ == "UnidentifiedImageError" else err
            errors[s["key"]] = (s["name"], f"cannot be read as an image: {type(err).__name__}: {why}")
            continue
        rows.append({"key": s["key"], "id": f"i-{s['sha256'][:16]}", "image": encode_png(image),
                     "width": image.shape[1], "height": image.shape[0], "prompt": "", "class_name": "",
                     "seed": 0, "model": "imported", "steps": 0, "guidance": 0.0, "provenance": "imported",
                     "source": s["name"], "original_width": ow, "original_height": oh})
    table = pa.Table.from_pylist(rows, schema=schema.IMPORTED)
    return Partial(table, errors) if errors else table


@dataclass
class Found:
    files: list[SourceFile]
    wanted: list[tuple[str, dict]]
    duplicates: list[tuple[str, str]]  # (file, the file it duplicates)


def plan(cfg: Sources, root: Path) -> Found:
    """The items the files make: one per distinct content."""
    files = find_files(cfg.images, root)
    wanted, first, duplicates = [], {}, []
    with progress(len(files), "import: hashing", unit="file") as bar:
        for f in files:
            try:
                sha = content_hash(f.path.read_bytes())
            except OSError as err:
                sha = content_hash(f"unreadable:{f.name}:{err}".encode())  # an item that fails, named
            if sha in first:
                duplicates.append((f.name, first[sha]))
            else:
                first[sha] = f.name
                key = item_key("import", VERSION, sha, cfg.max_size)
                wanted.append((key, {"key": key, "path": str(f.path), "name": f.name, "sha256": sha}))
            bar.update(1)
    return Found(files, wanted, duplicates)


@flow(name="import")
def import_flow(cfg: Sources, out: str, root: str = ".") -> dict:
    log = get_run_logger()
    found = plan(cfg, Path(root).absolute())
    for name, original in found.duplicates:
        log.info("import: %s has the bytes of %s: imported once", name, original)
    store = ShardStore(out, schema.IMPORTED, {"stage": "import", "params": cfg.digest()}, cfg.shard_rows,
                        sidecars=(SCAN,))
    with progress(len(found.wanted), "import") as bar:  # a file that cannot be read never stops the run
        stats = store.update(found.wanted, lambda specs: import_batch(cfg, specs), 64, bar.update)
    report_errors("import", out, stats)
    atomic_write_json(Path(out) / SCAN, {"digest": scan_digest(found.files), "entries": list(cfg.images),
                                         "files": len(found.files), "duplicates": found.duplicates})
    log.info("import: %d files, %d images (%d computed, %d reused), %d duplicates, %d failed", len(found.files),
             stats.wanted, stats.computed, stats.reused, len(found.duplicates), len(stats.failed))
    return {"files": len(found.files), "items": stats.wanted, "computed": stats.computed, "reused": stats.reused,
            "duplicates": len(found.duplicates), "failed": len(stats.failed),
            "errors": str(Path(out) / ERRORS) if stats.failed else None}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("import", ["out"], argv)
    return import_flow(params.sources, args.out, str(Path(args.params).absolute().parent))


if __name__ == "__main__":
    command(main)
