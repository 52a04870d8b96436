"""Stage discover: TokenCut on cached patch keys -> one mask and box per image, named by zero-shot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.devices import compute_dtype, resolve_device
from mirage.fingerprint import encoder_spec, model_fingerprint
from mirage.images import decode_png, encode_mask
from mirage.models import Encoder, load_encoder
from mirage.params import Discover, Errors, Features, Runner
from mirage.runner import open_runner
from mirage.stage import command, parse, pool_dir, progress, report_errors
from mirage.store import ERRORS, Partial, ShardStore, atomic_write_json, item_key, read_table, table_metadata
from tasks.discover import cut_to_object, discover_objects, zero_shot

VERSION = 5  # 2: float32 similarities; 3: float32 deflated ARPACK solve; 4: naming device/dtype in keys;
# 5: degenerate cuts dropped, images without an object are failed items


def discover_batch(encoder: Encoder, cfg: Discover, grid: tuple[int, int, int], rows: list[dict]) -> pa.Table | Partial:
    """Objects of a batch of images.  An image that cannot be decoded, whose
    patch features are not finite, or where no object is found (every cut
    empty or the whole image) is a failed item: left out, with its reason."""
    gh, gw, c = grid
    errors: dict[str, tuple[str, str]] = {}
    decoded = {}
    for r in rows:
        try:
            decoded[r["key"]] = decode_png(r["image"])
        except Exception as err:  # noqa: BLE001 - PIL raises several types
            errors[r["key"]] = (r["id"], f"cannot be decoded: {type(err).__name__}: {err}")
    found = []  # (row index, box, mask, score)
    cuts_cfg = {m: cfg.model_copy(update={"method": m}) for m in {r.get("method", cfg.method) for r in rows}}
    for i, r in enumerate(rows):
        if r["key"] in errors:
            continue
        feats = r["patches"].astype(np.float32).reshape(gh * gw, c)
        if not np.isfinite(feats).all():
            errors[r["key"]] = (r["id"], "non-finite patch features (NaN or inf)")
            continue
        h, w = decoded[r["key"]].shape[:2]
        kept = 0
        for cut in discover_objects(feats, (gh, gw), cuts_cfg[r.get("method", cfg.method)]):
            mask, box = cut_to_object(cut, h, w)
            if box[2] <= 0 or box[3] <= 0 or mask.all():  # degenerate: nothing, or the whole image
                continue
            found.append((i, box, encode_mask(mask), 1.0 - cut.eigenvalue))
            kept += 1
        if not kept:
            errors[r["key"]] = (r["id"], "no object found (every cut empty or the whole image)")
    prompts = [cfg.prompt_template.format(name) for name in cfg.classes]
    if found and encoder.has_text:
        images = [decoded[rows[f[0]]["key"]] for f in found]  # own sizes: crops are resized
        index, label_scores = zero_shot(encoder, images, [f[1] for f in found], prompts)
        labels = [cfg.classes[int(i)] for i in index]
    else:  # an image-only encoder (a timm ViT) names nothing: label "" with score 0
        labels, label_scores = [""] * len(found), [0.0] * len(found)
    objects: list[list[dict]] = [[] for _ in rows]
    for (i, box, mask, score), lab, ls in zip(found, labels, label_scores):
        objects[i].append({"box": box, "mask": mask, "score": score, "label": lab, "label_score": float(ls)})
    out = [{"key": r["key"], "image_id": r["id"], "prompt_class": r["class_name"], "objects": o}
           for r, o in zip(rows, objects) if r["key"] not in errors]
    table = pa.Table.from_pylist(out, schema=schema.OBJECTS)
    return Partial(table, errors) if errors else table


def write_coco(rows: list[dict], images: list[dict], classes: tuple[str, ...], path: Path) -> None:
    """The discovered objects as a COCO detection file (boxes x, y, w, h px)."""
    objects = [{**o, "image_id": r["image_id"]} for r in rows for o in r["objects"]]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    if any(o["label"] not in classes for o in objects):  # unnamed (an image-only encoder)
        cats.append({"id": len(classes) + 1, "name": "object"})
    coco = {
        "images": [{"id": i, "file_name": im["id"], "width": im["width"], "height": im["height"]} for i, im in enumerate(images)],
        "categories": cats,
        "annotations": [],
    }
    index = {im["id"]: i for i, im in enumerate(images)}
    for n, o in enumerate(objects):
        x, y, w, h = o["box"]
        coco["annotations"].append({
            "id": n + 1, "image_id": index[o["image_id"]], "category_id": classes.index(o["label"]) + 1 if o["label"] in classes else len(classes) + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "score": o["score"],
            "segmentation": {"size": [images[index[o["image_id"]]]["height"], images[index[o["image_id"]]]["width"]], "counts": o["mask"]},
        })
    atomic_write_json(path, coco)


@dataclass(frozen=True)
class DiscoverJob:
    """Cuts and zero-shot names, wherever they run (mirage/runner.py): the
    encoder (for naming) is loaded once per process; a batch is rows with
    their patches and image."""

    cfg: Discover
    fcfg: Features
    grid: tuple[int, int, int] = (0, 0, 0)

    def load_key(self) -> tuple:
        return ("discover", self.fcfg.encoder, self.fcfg.device, self.fcfg.dtype)

    def load(self) -> Encoder:
        return load_encoder(encoder_spec(self.fcfg.encoder), resolve_device(self.fcfg.device), self.fcfg.dtype)

    def describe(self, encoder: Encoder) -> dict:
        return {"model": model_fingerprint(encoder_spec(self.fcfg.encoder)), "has_text": encoder.has_text,
                "computed_on": (encoder.device.type, compute_dtype(self.fcfg.dtype, encoder.device))}

    def prepare(self, encoder: Encoder, rows: list[dict]) -> list[dict]:
        return rows

    def compute(self, encoder: Encoder, rows: list[dict]) -> pa.Table:
        return discover_batch(encoder, self.cfg, self.grid, rows)


BATCH = 32  # images per discover batch: 10 for the 300 toy images, an even split over Dask workers


@flow(name="discover")
def discover_flow(cfg: Discover, fcfg: Features, images: str, features: str, out: str, coco: str,
                  runner: Runner = Runner(), errors: Errors = Errors(), imported: str | None = None) -> dict[str, float]:
    """Objects in every image of `discover.sources` (generated: `images`,
    imported: `imported`); named by zero-shot with the configured encoder
    (`features.encoder`, on `features.device` in `features.dtype`)."""
    log = get_run_logger()
    tables = {"generated": images, "imported": imported}
    columns = ["id", "image", "class_name", "width", "height"]
    imgs = {r["id"]: {**r, "source": name} for name in cfg.sources if tables.get(name)
            for r in read_table(tables[name], columns=columns).to_pylist()}
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
            stats = store.update(wanted, None, BATCH, bar.update, run=lambda batches: run.map(job, batches),
                                 max_error_fraction=errors.max_fraction)
    report_errors("discover", out, stats)
    rows = read_table(out).to_pylist()
    write_coco(rows, [imgs[f["id"]] for f in feats], cfg.classes, Path(coco))
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
    params, args = parse("discover", ["images", "imported", "features", "out", "coco"], argv)
    return discover_flow(params.discover, params.features, args.images, args.features, args.out, args.coco,
                         params.runner, params.errors, args.imported)


if __name__ == "__main__":
    command(main)
