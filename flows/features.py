"""Stage features: global embeddings (+ patch features) of the generated images.

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
worker, which loads the encoder once (mirage/runner.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.fingerprint import encoder_spec, model_fingerprint
from mirage.devices import compute_dtype, resolve_device
from mirage.models import EncoderPatches, ImageEncoder, load_encoder, load_patch_backbone
from mirage.params import Errors, Features, Runner
from mirage.runner import open_runner
from mirage.stage import command, parse, pool_dir, progress, report_errors
from mirage.store import ERRORS, OrderedReader, Partial, ShardStore, item_key, iter_rows
from tasks.features import decode_batch, embed_batch, non_finite

VERSION = 2


def patch_mode(cfg: Features) -> str | None:
    """None, `keys`, `tokens` (from the encoder's own forward) or `unet`."""
    if not cfg.patches:
        return None
    if cfg.patch_backbone.startswith("unet"):
        return "unet"
    return cfg.patch_backbone.partition(":")[2] or "keys"


def encode(encoder: ImageEncoder, mode: str | None, unet, model_id: str, fschema: pa.Schema, batch) -> pa.Table | Partial:
    """A prepared batch's rows; items that failed to decode, or whose
    features are not finite, come back as a Partial's errors."""
    specs, images, pixels, errors = batch
    if not specs:
        return Partial(fschema.empty_table(), errors)
    emb, patches = embed_batch(encoder, pixels, images, mode, unet)
    n = len(specs)
    emb, patches = emb[:n], None if patches is None else patches[:n]  # drop the padding
    bad = non_finite(emb, patches)
    if bad:
        errors = errors | {specs[i]["key"]: (specs[i]["id"], "non-finite features (NaN or inf)") for i in bad}
        keep = [i for i in range(n) if i not in bad]
        specs, emb = [specs[i] for i in keep], emb[keep]
        patches = None if patches is None else patches[keep]
    cols = {
        "key": [s["key"] for s in specs],
        "id": [s["id"] for s in specs],
        "model": [model_id] * len(specs),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float16()), emb.shape[1]),
    }
    if patches is not None:
        cols["patches"] = pa.FixedSizeListArray.from_arrays(pa.array(patches.ravel(), pa.float16()), patches.shape[1])
    table = pa.table(cols, schema=fschema)
    return Partial(table, errors) if errors else table


@dataclass
class Loaded:
    encoder: ImageEncoder
    unet: object | None  # the patch backbone, when it is the generator's UNet
    decoders: ThreadPoolExecutor | None  # `features.workers` decode threads


@dataclass(frozen=True)
class FeaturesJob:
    """The encoder's batches, wherever they run (mirage/runner.py).  A batch is
    (specs, PNG bytes); `schema` and `model_id` come from describe()."""

    cfg: Features
    generator: str  # the generate.model whose UNet a `unet:` patch backbone uses
    model_id: str = ""
    schema: pa.Schema | None = None
    size: tuple[int, int] | None = None  # (h, w) every image is brought to: the first image's

    @property
    def batch_param(self) -> tuple[str, int]:
        """The key that sizes a batch (named when one runs out of memory)."""
        return "features.batch_size", self.cfg.batch_size

    def load_key(self) -> tuple:
        c = self.cfg
        return ("features", c.encoder, c.device, c.dtype, patch_mode(c), c.patch_backbone, self.generator, c.workers)

    def load(self) -> Loaded:
        encoder = load_encoder(encoder_spec(self.cfg.encoder), resolve_device(self.cfg.device), self.cfg.dtype)
        unet = load_patch_backbone(self.cfg.patch_backbone, encoder, self.generator) if patch_mode(self.cfg) == "unet" else None
        n = self.cfg.workers if self.cfg.workers != "auto" else (2 if encoder.device.type == "cuda" else 0)
        return Loaded(encoder, unet, ThreadPoolExecutor(n, thread_name_prefix="mirage-decode") if n else None)

    def describe(self, m: Loaded, probe: tuple[str, bytes] | None) -> dict:
        """Identity and shape of what this encoder makes; `probe`: one image
        (id, PNG) to measure the patch grid on."""
        mode = patch_mode(self.cfg)
        facts = {"model": model_fingerprint(encoder_spec(self.cfg.encoder)), "embed_dim": m.encoder.embed_dim,
                 # float32 on a CPU and float16 autocast on a GPU give other bytes: part of every key
                 "computed_on": (m.encoder.device.type, compute_dtype(self.cfg.dtype, m.encoder.device)),
                 # the UNet's identity, when it makes the patches
                 "patch_id": model_fingerprint(self.generator) if mode == "unet" else "", "grid": None}
        if mode and probe:
            image, _ = decode_batch([probe[0]], [probe[1]], None)
            feats, (gh, gw) = (m.unet if mode == "unet" else EncoderPatches(m.encoder, mode)).patches(image)
            facts["grid"] = (gh, gw, feats[0].size // (gh * gw))
        return facts

    def prepare(self, m: Loaded, batch: tuple[list[dict], list[bytes]]):
        specs, pngs = batch
        decoded, bad = decode_batch([s["id"] for s in specs], pngs, m.decoders, self.size)
        errors = {specs[i]["key"]: (specs[i]["id"], why) for i, why in bad.items()}
        specs = [s for i, s in enumerate(specs) if i not in bad]
        if decoded is None:
            return specs, None, None, errors
        pad = self.cfg.batch_size - len(decoded)  # one batch shape: an item's bytes never depend on its batch
        if pad > 0:
            decoded = np.concatenate([decoded, np.repeat(decoded[-1:], pad, axis=0)])
        return specs, decoded, m.encoder.prepare(decoded), errors

    def compute(self, m: Loaded, prepared) -> pa.Table:
        return encode(m.encoder, patch_mode(self.cfg), m.unet, self.model_id, self.schema, prepared)


def first_decodable(tables: list[str]) -> tuple[str, bytes] | None:
    """(id, PNG) of the first image that decodes: the patch grid is measured
    on it, and images of another size are resized to its size."""
    for images in tables:
        for row in iter_rows(images, ["id", "image"], batch_rows=16):
            if not decode_batch([row["id"]], [row["image"]], None)[1]:
                return row["id"], row["image"]
    return None


class TablesReader:
    """Images of several tables by (table, key), each table read in its own order."""

    def __init__(self, tables: list[str]):
        self.readers = [OrderedReader(t, ["image"]) for t in tables]

    def take(self, specs: list[dict]) -> list[bytes]:
        rows = {}
        for t, reader in enumerate(self.readers):
            keys = [s["src"] for s in specs if s["table"] == t]
            rows |= {(t, r["key"]): r["image"] for r in reader.take(keys)}
        return [rows[(s["table"], s["src"])] for s in specs]


@flow(name="features")
def features_flow(cfg: Features, images: str, generator: str, out: str, runner: Runner = Runner(),
                  errors: Errors = Errors(), imported: str | None = None) -> dict[str, int]:
    """`generator`: the configured generate.model, whose UNet a `unet:` patch
    backbone uses; `imported`: a second images table (stage import)."""
    log = get_run_logger()
    mode = patch_mode(cfg)
    tables = [images] + ([imported] if imported else [])
    source = [(t, r["key"], r["id"]) for t, table in enumerate(tables) for r in iter_rows(table, ["key", "id"])]
    with open_runner(runner, "features") as run:
        probe = first_decodable(tables) if source else None
        size = tuple(decode_batch([probe[0]], [probe[1]], None)[0].shape[1:3]) if probe else None
        facts = run.describe(FeaturesJob(cfg, generator), probe if mode else None)
        model_id, patch_id, computed_on = facts["model"], facts["patch_id"], tuple(facts["computed_on"])
        meta = {"stage": "features", "model": model_id, "params": cfg.digest()}
        patch_len = None
        if facts["grid"]:
            gh, gw, c = facts["grid"]
            patch_len = gh * gw * c
            meta |= {"grid": f"{gh},{gw},{c}", "patches": cfg.patch_backbone, "patches_model": patch_id or model_id}
        store = ShardStore(out, schema.features(facts["embed_dim"], patch_len), meta, cfg.shard_rows,
                           pool=pool_dir("features"), row_bytes=2 * (facts["embed_dim"] + (patch_len or 0)) + 64)
        job = FeaturesJob(cfg, generator, model_id, store.schema, size)
        wanted = []
        for t, src, image_id in source:
            # what determines an item: its image, the encoder's bytes, how patches are made, the batch shape
            # and the size images are brought to (the first image's: an imported one of another size is resized)
            key = item_key("features", VERSION, src, model_id, mode, cfg.patch_backbone if mode else "", patch_id,
                           cfg.batch_size, computed_on, size)
            wanted.append((key, {"key": key, "src": src, "id": image_id, "table": t}))
        reader = TablesReader(tables)

        def fetch(specs: list[dict]) -> tuple[list[dict], list[bytes]]:
            return specs, reader.take(specs)

        decoders = cfg.workers if cfg.workers != "auto" else (2 if computed_on[0] == "cuda" else 0)
        prefetch = 2 if decoders else 0  # the local runner prepares ahead only when it decodes in threads
        start = time.perf_counter()
        with progress(len(wanted), "features", unit="img") as bar:
            stats = store.update(wanted, None, cfg.batch_size, bar.update,
                                 run=lambda batches: run.map(job, batches, fetch, prefetch),
                                 max_error_fraction=errors.max_fraction)
    report_errors("features", out, stats)
    rate = stats.computed / max(time.perf_counter() - start, 1e-9)
    log.info("features: %d items (%d computed at %.1f img/s, %d reused of which %d from the pool, %d dropped) with %s "
             "(%s runner, %d model load(s))", stats.wanted, stats.computed, rate, stats.reused, stats.restored,
             stats.dropped, model_id, run.kind, len(run.loads))
    return {"items": stats.wanted, "computed": stats.computed, "reused": stats.reused, "restored": stats.restored,
            "failed": len(stats.failed), "errors": str(Path(out) / ERRORS) if stats.failed else None, "rate": round(rate, 2), "model_loads": len(run.loads)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("features", ["images", "imported", "out"], argv)
    return features_flow(params.features, args.images, params.generate.model, args.out, params.runner, params.errors,
                         args.imported)


if __name__ == "__main__":
    command(main)
