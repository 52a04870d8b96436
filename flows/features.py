"""Stage features: encoder embeddings (+ patch keys) of the generated images."""
from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task

from mirage import schema
from mirage.fingerprint import encoder_spec, model_fingerprint
from mirage.images import decode_png
from mirage.models import Encoder, load_encoder, load_patch_backbone
from mirage.params import Features
from mirage.stage import parse, progress
from mirage.store import ShardStore, item_key, read_table
from tasks.features import embed_images

VERSION = 1


@task
def encode(encoder: Encoder, backbone, model_id: str, fschema: pa.Schema, rows: list[dict]) -> pa.Table:
    emb, keys = embed_images(encoder, backbone, [r["image"] for r in rows])
    cols = {
        "key": [r["key"] for r in rows],
        "id": [r["id"] for r in rows],
        "model": [model_id] * len(rows),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float16()), emb.shape[1]),
    }
    if keys is not None:
        cols["patches"] = pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.float16()), keys.shape[1])
    return pa.table(cols, schema=fschema)


@flow(name="features")
def features_flow(cfg: Features, images: str, encoder_arg: str, generator: str, out: str) -> dict[str, int]:
    log = get_run_logger()
    spec = encoder_spec(encoder_arg)
    encoder = load_encoder(spec)
    backbone = load_patch_backbone(cfg.patch_backbone, encoder, generator) if cfg.patches else None
    # the patch features' identity: the encoder's for its keys, the generator's for its UNet
    patch_id = (model_fingerprint(generator) if cfg.patch_backbone.startswith("unet") else "") if cfg.patches else ""
    model_id = model_fingerprint(spec)
    source = read_table(images, columns=["key", "id", "image"]).to_pylist()
    meta = {"stage": "features", "model": model_id, "params": cfg.digest()}
    patch_len = None
    if backbone is not None and source:
        probe, (gh, gw) = backbone.patches(np.stack([decode_png(source[0]["image"])]))
        patch_len = probe.size
        meta |= {"grid": f"{gh},{gw},{probe.shape[-1]}", "patches": cfg.patch_backbone, "patches_model": patch_id or model_id}
    store = ShardStore(out, schema.features(encoder.embed_dim, patch_len), meta, cfg.shard_rows)
    wanted = []
    for row in source:
        key = item_key("features", VERSION, row["key"], model_id, cfg.patches, cfg.patch_backbone, patch_id)
        wanted.append((key, {"key": key, "id": row["id"], "image": row["image"]}))
    with progress(len(wanted), "features") as bar:
        stats = store.update(wanted, lambda rows: encode(encoder, backbone, model_id, store.schema, rows),
                             cfg.batch_size, bar.update)
    log.info("features: %d items (%d computed, %d reused) with %s", stats.wanted, stats.computed, stats.reused, model_id)
    return {"items": stats.wanted, "computed": stats.computed}


def main(argv: list[str] | None = None) -> None:
    params, args = parse("features", ["images", "encoder", "generator", "out"], argv)
    features_flow(params.features, args.images, args.encoder, args.generator, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
