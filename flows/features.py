"""Stage features: global embeddings (+ patch features) of the generated and
imported images, and embeddings of a sample of real ones (`--reference`, what
evaluate measures the generated images against: FD, precision/recall).

Images stream from the images table in key order; with workers (the default
on a GPU) a background thread reads, decodes (with `features.workers`
threads) and preprocesses the next batches while the model runs on the
current one.  On CPU the default is inline: the model already keeps every core
busy, and measured inline was faster (benchmarks/features_throughput.py).  Only missing items are
computed; rows of a previous encoder are kept in the pool, so switching back
restores them.  On the local runner batches are plain calls inside the flow
run: a Prefect task run per batch cost ~4% of ViT-B-32 throughput on 2 cores
and would flood the UI at 100k images; the flow run carries the logs, rates and
counts.  With `runner.kind: dask` each batch is a Prefect task on a Dask
worker, which loads the encoder once (mirage/run/runner.py).
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data import schema
from mirage.data.params import Errors, Features, Runner
from mirage.data.store import ERRORS, ShardStore, item_key, iter_rows
from mirage.run.runner import open_runner
from mirage.run.stage import command, parse, pool_dir, progress, report_errors
from tasks.features import (
    VERSION,
    FeaturesJob,
    TablesReader,
    decode_batch,
    first_decodable,
    patch_mode,
)
from tasks.quality import reference_sample


@flow(name="features")
def features_flow(cfg: Features, images: str, generator: str, out: str, runner: Runner = Runner(),
                  errors: Errors = Errors(), imported: str | None = None, reference: str | None = None,
                  reference_out: str | None = None, reference_n: int = 0, concepts: str | None = None) -> dict[str, int]:
    """`generator`: the configured generate.model, whose UNet a `unet:` patch
    backbone uses; `concepts`: stage concepts' output (a `concepts` patch
    backbone's units); `imported`: a second images table (stage import);
    `reference`: the real images that generated ones are measured against
    (evaluate's FD, precision/recall): a seeded sample of `reference_n` of
    them is embedded into `reference_out`, without patch features."""
    log = get_run_logger()
    tables = [images] + ([imported] if imported else [])
    source = [(t, r["key"], r["id"]) for t, table in enumerate(tables) for r in iter_rows(table, ["key", "id"])]
    with open_runner(runner, "features") as run:
        probe = first_decodable(tables) if source else None
        size = tuple(decode_batch([probe[0]], [probe[1]], None)[0].shape[1:3]) if probe else None
        stats, rate = embed_tables(run, cfg, generator, tables, source, out, size, probe, errors, "features", concepts)
        report_errors("features", out, stats)
        log.info("features: %d items (%d computed at %.1f img/s, %d reused of which %d from the pool, %d dropped) "
                 "(%s runner, %d model load(s))", stats.wanted, stats.computed, rate, stats.reused, stats.restored,
                 stats.dropped, run.kind, len(run.loads))
        result = {"items": stats.wanted, "computed": stats.computed, "reused": stats.reused,
                  "restored": stats.restored, "failed": len(stats.failed),
                  "errors": str(Path(out) / ERRORS) if stats.failed else None, "rate": round(rate, 2)}
        if reference and reference_out:
            sample = reference_sample(reference, reference_n)
            ref = embed_tables(run, cfg.model_copy(update={"patches": False}), generator, [reference],
                               [(0, key, image_id) for key, image_id in sample], reference_out, size, None, errors,
                               "reference")[0]
            report_errors("reference", reference_out, ref)
            log.info("reference: %d of %s's images (%d computed, %d reused)", ref.wanted, reference, ref.computed,
                     ref.reused)
            result |= {"reference": ref.wanted, "reference_computed": ref.computed}
    return result | {"model_loads": len(run.loads)}


def embed_tables(run, cfg: Features, generator: str, tables: list[str], source: list[tuple[int, str, str]],
                 out: str, size: tuple[int, int] | None, probe: tuple[str, bytes] | None, errors: Errors, what: str,
                 concepts: str | None = None):
    """Embeddings (+ patch features when `cfg.patches`) of the images
    `source` names, (table index, key, id) in the order the table keeps,
    into the features table `out`; `probe`: the image the patch grid is
    measured on.  Returns (the store's stats, images/s)."""
    mode = patch_mode(cfg)
    facts = run.describe(FeaturesJob(cfg, generator, concepts), probe if mode else None)
    model_id, patch_id, computed_on = facts["model"], facts["patch_id"], tuple(facts["computed_on"])
    meta = {"stage": "features", "model": model_id, "params": cfg.digest()}
    patch_len = None
    if facts["grid"]:
        gh, gw, c = facts["grid"]
        patch_len = gh * gw * c
        meta |= {"grid": f"{gh},{gw},{c}", "patches": cfg.patch_backbone, "patches_model": patch_id or model_id}
    store = ShardStore(out, schema.features(facts["embed_dim"], patch_len), meta, cfg.shard_rows,
                       pool=pool_dir(what), row_bytes=2 * (facts["embed_dim"] + (patch_len or 0)) + 64)
    job = FeaturesJob(cfg, generator, concepts, model_id, store.schema, size)
    wanted = []
    for t, src, image_id in source:
        # what determines an item: its image, the encoder's bytes, how patches are made, the batch shape
        # and the size images are brought to (the first image's: an imported one of another size is resized)
        key = item_key("features", VERSION, src, model_id, mode, cfg.patch_backbone if mode else "", patch_id,
                       cfg.batch_size, computed_on, size, *([] if cfg.merges_nothing else [cfg.tome_r]))
        wanted.append((key, {"key": key, "src": src, "id": image_id, "table": t}))
    reader = TablesReader(tables)

    def fetch(specs: list[dict]) -> tuple[list[dict], list[bytes]]:
        return specs, reader.take(specs)

    decoders = cfg.workers if cfg.workers != "auto" else (2 if computed_on[0] == "cuda" else 0)
    prefetch = 2 if decoders else 0  # the local runner prepares ahead only when it decodes in threads
    start = time.perf_counter()
    with progress(len(wanted), what, unit="img") as bar:
        stats = store.update(wanted, None, cfg.batch_size, bar.update, on_plan=bar.plan,
                             run=lambda batches: run.map(job, batches, fetch, prefetch),
                             max_error_fraction=errors.max_fraction)
    return stats, stats.computed / max(time.perf_counter() - start, 1e-9)


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("features", ["images", "imported", "real", "out", "reference", "concepts"], argv)
    real = args.real if params.evaluate.reference == "toyworld" else args.imported  # the real images' table
    return features_flow(params.features, args.images, params.generate.model, args.out, params.runner, params.errors,
                         args.imported, real, args.reference, 2 * params.evaluate.quality_n, args.concepts)


if __name__ == "__main__":
    command(main)
