"""Stage concepts: units of the generator and the encoders that fire together (Rosetta Neurons).

Writes `data/concepts`: chunks/ (the moments of every chunk of images, a
store table: a run with more images computes only the new chunks),
pairs.parquet (every best-buddy pair of every condition, with its
ground-truth scores), measures.json (what evaluate reports), and
plots/concepts.png (the top concepts' maps on a few generated images).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from mirage.data.images import decode_png
from mirage.data.params import Errors, Params, Runner
from mirage.data.store import ShardStore, atomic_write_bytes, atomic_write_json, item_key, read_table
from mirage.run.runner import loaded, open_runner
from mirage.run.stage import command, parse, pool_dir, progress, report_errors
from tasks.concepts import (
    BATCH,
    CHUNKS,
    VERSION,
    ConceptsJob,
    check_memory,
    measure,
    plan_chunks,
)
from tasks.concept_stats import moments_from_bytes

CHUNK_TABLE = "chunks"


def _images(params: Params, tables: dict[str, str | None]) -> list[dict]:
    cfg = params.concepts
    rows = [r for source in cfg.sources if tables.get(source) and (Path(tables[source]) / "manifest.json").exists()
            for r in read_table(tables[source], columns=["key", "id", "image"]).to_pylist()]
    return rows[: cfg.images] if cfg.images else rows


def _scenes(path: str | None) -> list[dict]:
    if not path or not (Path(path) / "manifest.json").exists():
        return []
    return read_table(path, columns=["image", "width", "height", "objects"]).to_pylist()


@flow(name="concepts")
def concepts_flow(params: Params, images: str, out: str, plot: str, imported: str | None = None,
                  test: str | None = None, ood: str | None = None, runner: Runner = Runner(),
                  errors: Errors = Errors()) -> dict:
    """Best buddies between `generate.model` and `features.encoder` (and
    `concepts.models`), trained, random-weight and shuffled, measured on the
    `test` and `ood` scenes' object masks."""
    log = get_run_logger()
    cfg = params.concepts
    encoders = (params.features.encoder, *cfg.models)
    job = ConceptsJob(cfg, params.generate.model, tuple(encoders), cfg.device, cfg.batch_size)
    rows = _images(params, {"generated": images, "imported": imported})
    if len(rows) < 2:
        raise ValueError(f"concepts.sources {list(cfg.sources)}: {len(rows)} image(s); correlation needs at least 2")
    png = {r["key"]: r["image"] for r in rows}
    table = Path(out) / CHUNK_TABLE
    previous = read_table(table, columns=["items"]).column("items").to_pylist() if (table / "manifest.json").exists() else []
    with open_runner(runner, "concepts") as run:
        facts = run.describe(job)
        check_memory(facts["units"])
        chunks = plan_chunks([r["key"] for r in rows], previous, cfg.chunk)
        models_id = (facts["generator"], *facts["encoders"], facts["device"], cfg.moments_digest())
        wanted = []
        for c in chunks:
            key = item_key("concepts", VERSION, models_id, *c)
            wanted.append((key, {"key": key, "images": [(k, png[k]) for k in c]}))
        store = ShardStore(table, CHUNKS, {"stage": "concepts", "params": cfg.moments_digest(),
                                           "model": json.dumps(facts["generator"])}, cfg.shard_rows,
                           pool=pool_dir("concepts"))  # switching models back restores their chunks
        with progress(len(wanted), "concepts", unit="chunk") as bar:
            stats = store.update(wanted, None, BATCH, bar.update, on_plan=bar.plan,
                                 run=lambda batches: run.map(job, batches), max_error_fraction=errors.max_fraction)
        # the measures need the models here too: a local runner's loaded copy (it is released when the runner closes)
        models = loaded(job)[1]
        moments = [moments_from_bytes(b) for b in read_table(table, columns=["moments"]).column("moments").to_pylist()]
        splits = {name: scenes for name, scenes in (("test", _scenes(test)), ("ood", _scenes(ood))) if scenes}
        sample = np.stack([decode_png(r["image"]) for r in rows[: cfg.sample_images]])
        result, pairs, picture = measure(cfg, models, moments, splits, sample)
    report_errors("concepts", table, stats)
    result |= {"images": len(rows), "chunks": len(chunks), "grid": cfg.grid, "timestep": cfg.timestep}
    buf = io.BytesIO()
    pq.write_table(pairs, buf)
    atomic_write_bytes(Path(out) / "pairs.parquet", buf.getvalue())
    atomic_write_json(Path(out) / "measures.json", result)
    atomic_write_bytes(Path(plot), picture)
    t, r, s = result["trained"], result["random"], result["shuffled"]
    log.info("concepts: %d images (%d of %d chunks computed); best buddies trained %d (mean r %.3f), random %d "
             "(%.3f), shuffled %d (%.3f); split-half Jaccard %.2f; object concepts on test: trained %s, random %s",
             len(rows), stats.computed, len(chunks), t["best_buddies"], t["mean_corr"], r["best_buddies"],
             r["mean_corr"], s["best_buddies"], s["mean_corr"], result["stability"]["jaccard"],
             t.get("test", {}).get("object_concepts"), r.get("test", {}).get("object_concepts"))
    # what was reused is not a measure: measures.json (evaluate's input) is the same however it was reached
    return result | {"items": len(chunks), "computed": stats.computed, "reused": stats.reused,
                     "failed": len(stats.failed)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (the measures)."""
    params, args = parse("concepts", ["images", "imported", "test", "ood", "out", "plot"], argv)
    return concepts_flow(params, args.images, args.out, args.plot, args.imported, args.test, args.ood,
                         params.runner, params.errors)


if __name__ == "__main__":
    command(main)
