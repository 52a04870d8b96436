"""Stage features: global embeddings (+ patch features) of the generated images.

Images stream from the images table in key order; with workers (the default
on a GPU) a background thread reads, decodes (with `features.workers`
threads) and preprocesses the next batches while the model runs on the
current one.  On CPU the default is inline: the model already keeps every core
busy, and measured inline was faster (benchmarks/features_throughput.py).  Only missing items are
computed; rows of a previous encoder are kept in the pool, so switching back
restores them.  Batches are plain calls inside the flow run: a Prefect task run
per batch cost ~4% of ViT-B-32 throughput on 2 cores and would flood the UI at
100k images; the flow run carries the logs, rates and counts.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.fingerprint import encoder_spec, model_fingerprint
from mirage.devices import compute_dtype, resolve_device
from mirage.models import EncoderPatches, ImageEncoder, load_encoder, load_patch_backbone
from mirage.params import Features
from mirage.stage import parse, pool_dir, progress
from mirage.store import OrderedReader, ShardStore, item_key, iter_rows
from tasks.features import decode_batch, embed_batch

VERSION = 2


def patch_mode(cfg: Features) -> str | None:
    """None, `keys`, `tokens` (from the encoder's own forward) or `unet`."""
    if not cfg.patches:
        return None
    if cfg.patch_backbone.startswith("unet"):
        return "unet"
    return cfg.patch_backbone.partition(":")[2] or "keys"


def encode(encoder: ImageEncoder, mode: str | None, unet, model_id: str, fschema: pa.Schema, batch) -> pa.Table:
    specs, images, pixels = batch
    emb, patches = embed_batch(encoder, pixels, images, mode, unet)
    n = len(specs)
    emb, patches = emb[:n], None if patches is None else patches[:n]  # drop the padding
    cols = {
        "key": [s["key"] for s in specs],
        "id": [s["id"] for s in specs],
        "model": [model_id] * len(specs),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float16()), emb.shape[1]),
    }
    if patches is not None:
        cols["patches"] = pa.FixedSizeListArray.from_arrays(pa.array(patches.ravel(), pa.float16()), patches.shape[1])
    return pa.table(cols, schema=fschema)


@flow(name="features")
def features_flow(cfg: Features, images: str, generator: str, out: str) -> dict[str, int]:
    """`generator`: the configured generate.model, whose UNet a `unet:` patch backbone uses."""
    log = get_run_logger()
    spec = encoder_spec(cfg.encoder)
    encoder = load_encoder(spec, resolve_device(cfg.device), cfg.dtype)
    mode = patch_mode(cfg)
    unet = load_patch_backbone(cfg.patch_backbone, encoder, generator) if mode == "unet" else None
    model_id = model_fingerprint(spec)
    # float32 on a CPU and float16 autocast on a GPU give other bytes: part of every key
    computed_on = (encoder.device.type, compute_dtype(cfg.dtype, encoder.device))
    patch_id = model_fingerprint(generator) if mode == "unet" else ""  # the UNet's identity, when it makes the patches
    source = [(r["key"], r["id"]) for r in iter_rows(images, ["key", "id"])]
    meta = {"stage": "features", "model": model_id, "params": cfg.digest()}
    patch_len = None
    if mode and source:
        first = OrderedReader(images, ["image"]).take([source[0][0]])[0]["image"]
        probe = decode_batch([source[0][1]], [first], None)
        feats, (gh, gw) = (unet if mode == "unet" else EncoderPatches(encoder, mode)).patches(probe)
        patch_len = feats[0].size
        meta |= {"grid": f"{gh},{gw},{patch_len // (gh * gw)}", "patches": cfg.patch_backbone,
                 "patches_model": patch_id or model_id}
    store = ShardStore(out, schema.features(encoder.embed_dim, patch_len), meta, cfg.shard_rows,
                       pool=pool_dir("features"), row_bytes=2 * (encoder.embed_dim + (patch_len or 0)) + 64)
    wanted = []
    for src, image_id in source:
        # what determines an item: its image, the encoder's bytes, how patches are made, the batch shape
        key = item_key("features", VERSION, src, model_id, mode, cfg.patch_backbone if mode else "", patch_id,
                       cfg.batch_size, computed_on)
        wanted.append((key, {"key": key, "src": src, "id": image_id}))
    reader = OrderedReader(images, ["image"])
    n_workers = cfg.workers if cfg.workers != "auto" else (2 if encoder.device.type == "cuda" else 0)
    workers = ThreadPoolExecutor(n_workers, thread_name_prefix="mirage-decode") if n_workers else None

    def prepare(specs: list[dict]):
        rows = reader.take([s["src"] for s in specs])
        decoded = decode_batch([s["id"] for s in specs], [r["image"] for r in rows], workers)
        pad = cfg.batch_size - len(decoded)  # one batch shape: an item's bytes never depend on its batch
        if pad > 0:
            decoded = np.concatenate([decoded, np.repeat(decoded[-1:], pad, axis=0)])
        return specs, decoded, encoder.prepare(decoded)

    start = time.perf_counter()
    try:
        with progress(len(wanted), "features", unit="img") as bar:
            stats = store.update(wanted, lambda batch: encode(encoder, mode, unet, model_id, store.schema, batch),
                                 cfg.batch_size, bar.update, prepare=prepare, prefetch=2 if n_workers else 0)
    finally:
        if workers:
            workers.shutdown()
    rate = stats.computed / max(time.perf_counter() - start, 1e-9)
    log.info("features: %d items (%d computed at %.1f img/s, %d reused of which %d from the pool, %d dropped) with %s",
             stats.wanted, stats.computed, rate, stats.reused, stats.restored, stats.dropped, model_id)
    return {"items": stats.wanted, "computed": stats.computed, "reused": stats.reused, "restored": stats.restored,
            "rate": round(rate, 2)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("features", ["images", "out"], argv)
    return features_flow(params.features, args.images, params.generate.model, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
