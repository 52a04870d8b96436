"""Stage import: your own images (`sources.images`) into an images table.

The table has the generated images' columns (so discover and train_detector
read both alike) plus where each image came from: provenance `imported`, the
original path, its size before any resizing.  An item's key is its content
hash: a new file is one new item, a changed file recomputes that item only, a
file with the bytes of another is a duplicate (kept once).  Files that cannot
be read are listed in the table's errors.parquet and retried next run.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data import schema
from mirage.data.params import Sources
from mirage.data.store import ERRORS, ShardStore, atomic_write_json
from mirage.run.stage import command, parse, progress, report_errors
from mirage.data.sources import SCAN, find_files, record_scan
from tasks.import_images import import_batch, plan


@flow(name="import")
def import_flow(cfg: Sources, out: str, root: str = ".") -> dict:
    log = get_run_logger()
    files = find_files(cfg.images, Path(root).absolute())  # an entry naming nothing fails here, named
    with progress(len(files), "import: hashing", unit="file") as bar:
        found = plan(cfg, files, bar.update)
    for name, original in found.duplicates:
        log.info("import: %s has the bytes of %s: imported once", name, original)
    store = ShardStore(out, schema.IMPORTED, {"stage": "import", "params": cfg.digest()}, cfg.shard_rows,
                        sidecars=(SCAN,))
    with progress(len(found.wanted), "import") as bar:  # a file that cannot be read never stops the run
        stats = store.update(found.wanted, lambda specs: import_batch(cfg, specs), 64, bar.update,
                             on_plan=bar.plan)
    report_errors("import", out, stats)
    atomic_write_json(Path(out) / SCAN, {"entries": list(cfg.images), "files": len(found.files),
                                         "duplicates": found.duplicates})
    record_scan(Path(root).absolute(), out, found.files)  # outside the table: it holds file times
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
