"""Stage discover: TokenCut on cached patch keys -> one mask and box per image, named by zero-shot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger

from mirage.data import schema
from mirage.data.params import Discover, Errors, Features, Runner
from mirage.data.store import (
    ERRORS,
    ShardStore,
    atomic_write_json,
    item_key,
    read_table,
    table_metadata,
)
from mirage.run.runner import open_runner
from mirage.run.stage import command, parse, pool_dir, progress, report_errors
from tasks.curate import kept_ids
from tasks.discover import BATCH, VERSION, DiscoverJob, coco_detections


@flow(name="discover")
def discover_flow(cfg: Discover, fcfg: Features, images: str, features: str, out: str, coco: str,
                  runner: Runner = Runner(), errors: Errors = Errors(), imported: str | None = None,
                  kept: set[str] | None = None) -> dict[str, float]:
    """Objects in every image of `discover.sources` (generated: `images`,
    imported: `imported`; of the generated ones only those in `kept` when
    given: stage curate's); named by zero-shot with the configured encoder
    (`features.encoder`, on `features.device` in `features.dtype`)."""
    log = get_run_logger()
    tables = {"generated": images, "imported": imported}
    columns = ["id", "image", "class_name", "width", "height"]
    imgs = {r["id"]: {**r, "source": name} for name in cfg.sources if tables.get(name)
            for r in read_table(tables[name], columns=columns).to_pylist()
            if kept is None or name != "generated" or r["id"] in kept}
    meta = table_metadata(features)
    grid = tuple(int(v) for v in meta["grid"].split(","))
    table = read_table(features, columns=["key", "id", "patches"])
    # patches straight to one float16 array: as Python lists they cost more than the cut
    patches = table.column("patches").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    feats = [{"key": k, "id": i, "patches": p} for k, i, p in
             zip(table.column("key").to_pylist(), table.column("id").to_pylist(), patches) if i in imgs]
    with open_runner(runner, "discover") as run:
        job = DiscoverJob(cfg, fcfg, grid)
        facts = run.describe(job)
        model_id = facts["model"]
        # what names an object: the encoder's bytes and the device and precision it runs in
        naming = (model_id, *facts["computed_on"])
        wanted = []
        for f in feats:
            image = imgs[f["id"]]
            method = cfg.method_for(image["source"])
            # an imported image's cut may be another method than the generated images' (discover.imported_method)
            key = item_key("discover", VERSION, f["key"], naming, cfg.digest(), *([method] if image["source"] == "imported" else []))
            wanted.append((key, {**f, "key": key, "image": image["image"], "class_name": image["class_name"], "method": method}))
        store = ShardStore(out, schema.OBJECTS, {"stage": "discover", "model": model_id, "params": cfg.digest()},
                           cfg.shard_rows, pool=pool_dir("discover"))
        with progress(len(wanted), "discover") as bar:
            stats = store.update(wanted, None, BATCH, bar.update, on_plan=bar.plan, run=lambda batches: run.map(job, batches),
                                 max_error_fraction=errors.max_fraction)
    report_errors("discover", out, stats)
    rows = read_table(out).to_pylist()
    atomic_write_json(Path(coco), coco_detections(rows, [imgs[f["id"]] for f in feats], cfg.classes))
    if not facts["has_text"]:
        log.warning("discover: %s has no text tower, objects are not named", fcfg.encoder)
    top = [r["objects"][0]["label"] == r["prompt_class"] for r in rows if r["objects"] and r["prompt_class"]]
    agree = float(np.mean(top)) if top else 0.0
    n_objects = sum(len(r["objects"]) for r in rows)
    log.info("discover: %d objects in %d images (%d computed, %d reused of which %d from the pool; %s runner, "
             "%d model load(s)); top object's zero-shot label = prompt class for %.1f%%", n_objects, len(rows),
             stats.computed, stats.reused, stats.restored, run.kind, len(run.loads), 100 * agree)
    return {"objects": n_objects, "label_agreement": agree, "items": stats.wanted, "computed": stats.computed,
            "reused": stats.reused, "restored": stats.restored, "failed": len(stats.failed), "errors": str(Path(out) / ERRORS) if stats.failed else None,
            "model_loads": len(run.loads)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("discover", ["images", "imported", "features", "curated", "out", "coco"], argv)
    kept = kept_ids(args.curated) if params.curate.enabled else None
    return discover_flow(params.discover, params.features, args.images, args.features, args.out, args.coco,
                         params.runner, params.errors, args.imported, kept)


if __name__ == "__main__":
    command(main)
