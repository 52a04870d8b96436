"""Stage curate: semantic dedup and balanced clusters over the generated images' embeddings.

Writes `data/curated`: curated.parquet (id, cluster per level, kept, the
reason an image was dropped, the kept image it duplicates), state.json (the
clusters and decisions the next run starts from) and duplicates.png (the
largest duplicate groups).  With `curate.enabled: false` every image is kept
and nothing is clustered; discover reads the kept ids when it is on.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import flow, get_run_logger

from mirage.data.params import Curate
from mirage.data.store import atomic_dir, read_table, table_metadata
from mirage.run.stage import command, parse
from tasks.curate import STATE, TABLE, curate, curated_schema, duplicate_groups_png, state_bytes, table_bytes
from tasks.quality import embeddings_by_id


@flow(name="curate")
def curate_flow(cfg: Curate, images: str, features: str, out: str) -> dict:
    log = get_run_logger()
    gen = {r["id"]: r["class_name"] for r in read_table(images, columns=["id", "class_name"]).to_pylist()}
    ids, emb = embeddings_by_id(features, set(gen))  # failed items have no features: not curated
    previous_state = Path(out) / STATE
    previous = json.loads(previous_state.read_text()) if cfg.enabled and previous_state.exists() else None
    if cfg.enabled:
        result = curate(cfg, ids, [gen[i] for i in ids], emb, table_metadata(features)["model"], previous)
        table, state, reused = result.table, result.state, result.reused
        dups = table.filter(pc.equal(table.column("reason"), "duplicate"))
        shown = set(dups.column("id").to_pylist()) | set(dups.column("nearest_kept").to_pylist())
        pngs = {r["id"]: r["image"] for r in read_table(images, columns=["id", "image"]).to_pylist() if r["id"] in shown}
        sheet = duplicate_groups_png(table, pngs)
    else:
        schema = curated_schema(len(cfg.clusters))
        table = pa.Table.from_pylist(
            [{"id": i, "class_name": gen[i], **{f"cluster_{lv}": -1 for lv in range(len(cfg.clusters))},
              "kept": True, "reason": "", "nearest_kept": None, "cosine": None} for i in ids], schema=schema)
        state, reused, sheet = {"enabled": False}, len(ids), None  # kept by rule: nothing computed
    reasons = table.column("reason").to_pylist()
    counts = {"items": len(ids), "kept": reasons.count(""), "duplicates": reasons.count("duplicate"),
              "balance": reasons.count("balance"), "reused": reused, "computed": len(ids) - reused}
    with atomic_dir(out) as tmp:
        (tmp / TABLE).write_bytes(table_bytes(table))
        (tmp / STATE).write_bytes(state_bytes(state))
        if sheet:
            (tmp / "duplicates.png").write_bytes(sheet)
    log.info("curate: %d of %d generated images kept (%d duplicates, %d over their cluster's quota; %s)",
             counts["kept"], counts["items"], counts["duplicates"], counts["balance"],
             "on" if cfg.enabled else "off: curate.enabled is false")
    return counts


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts)."""
    params, args = parse("curate", ["images", "features", "out"], argv)
    return curate_flow(params.curate, args.images, args.features, args.out)


if __name__ == "__main__":
    command(main)
