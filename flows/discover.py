"""Stage discover: TokenCut on cached patch keys -> one mask and box per image, named by zero-shot."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task

from mirage import schema
from mirage.fingerprint import encoder_spec, model_fingerprint
from mirage.images import decode_png, encode_mask
from mirage.models import Encoder, load_encoder
from mirage.params import Discover
from mirage.stage import parse, progress
from mirage.store import ShardStore, atomic_write_json, item_key, read_table, table_metadata
from tasks.discover import cut_to_object, discover_objects, zero_shot

VERSION = 3  # 2: float32 similarities; 3: float32 deflated ARPACK solve


@task
def discover_batch(encoder: Encoder, cfg: Discover, grid: tuple[int, int, int], rows: list[dict]) -> pa.Table:
    gh, gw, c = grid
    images = np.stack([decode_png(r["image"]) for r in rows])
    h, w = images.shape[1:3]
    found = []  # (row index, box, mask, score)
    for i, r in enumerate(rows):
        for cut in discover_objects(r["patches"].astype(np.float32).reshape(gh * gw, c), (gh, gw), cfg):
            mask, box = cut_to_object(cut, h, w)
            found.append((i, box, encode_mask(mask), 1.0 - cut.eigenvalue))
    prompts = [cfg.prompt_template.format(name) for name in cfg.classes]
    labels, label_scores = (
        zero_shot(encoder, images[[f[0] for f in found]], [f[1] for f in found], prompts) if found else ([], [])
    )
    objects: list[list[dict]] = [[] for _ in rows]
    for (i, box, mask, score), lab, ls in zip(found, labels, label_scores):
        objects[i].append({"box": box, "mask": mask, "score": score, "label": cfg.classes[int(lab)], "label_score": float(ls)})
    out = [{"key": r["key"], "image_id": r["id"], "prompt_class": r["class_name"], "objects": o} for r, o in zip(rows, objects)]
    return pa.Table.from_pylist(out, schema=schema.OBJECTS)


def write_coco(rows: list[dict], images: list[dict], classes: tuple[str, ...], path: Path) -> None:
    """The discovered objects as a COCO detection file (boxes x, y, w, h px)."""
    objects = [{**o, "image_id": r["image_id"]} for r in rows for o in r["objects"]]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(classes)]
    coco = {
        "images": [{"id": i, "file_name": im["id"], "width": im["width"], "height": im["height"]} for i, im in enumerate(images)],
        "categories": cats,
        "annotations": [],
    }
    index = {im["id"]: i for i, im in enumerate(images)}
    for n, o in enumerate(objects):
        x, y, w, h = o["box"]
        coco["annotations"].append({
            "id": n + 1, "image_id": index[o["image_id"]], "category_id": classes.index(o["label"]) + 1,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "score": o["score"],
            "segmentation": {"size": [images[index[o["image_id"]]]["height"], images[index[o["image_id"]]]["width"]], "counts": o["mask"]},
        })
    atomic_write_json(path, coco)


@flow(name="discover")
def discover_flow(cfg: Discover, images: str, features: str, encoder_arg: str, out: str, coco: str) -> dict[str, float]:
    log = get_run_logger()
    meta = table_metadata(features)
    grid = tuple(int(v) for v in meta["grid"].split(","))
    spec = encoder_spec(encoder_arg)
    model_id = model_fingerprint(spec)
    table = read_table(features, columns=["key", "id", "patches"])
    # patches straight to one float16 array: as Python lists they cost more than the cut
    patches = table.column("patches").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    feats = [{"key": k, "id": i, "patches": p} for k, i, p in
             zip(table.column("key").to_pylist(), table.column("id").to_pylist(), patches)]
    imgs = {r["id"]: r for r in read_table(images, columns=["id", "image", "class_name", "width", "height"]).to_pylist()}
    wanted = []
    for f in feats:
        key = item_key("discover", VERSION, f["key"], model_id, cfg.digest())
        wanted.append((key, {**f, "key": key, "image": imgs[f["id"]]["image"], "class_name": imgs[f["id"]]["class_name"]}))
    encoder = load_encoder(spec)
    store = ShardStore(out, schema.OBJECTS, {"stage": "discover", "model": model_id, "params": cfg.digest()}, cfg.shard_rows)
    with progress(len(wanted), "discover") as bar:
        stats = store.update(wanted, lambda rows: discover_batch(encoder, cfg, grid, rows), 256, bar.update)
    rows = read_table(out).to_pylist()
    write_coco(rows, [imgs[f["id"]] for f in feats], cfg.classes, Path(coco))
    top = [r["objects"][0]["label"] == r["prompt_class"] for r in rows if r["objects"]]
    agree = float(np.mean(top)) if top else 0.0
    n_objects = sum(len(r["objects"]) for r in rows)
    log.info("discover: %d objects in %d images (%d computed, %d reused); top object's zero-shot label = "
             "prompt class for %.1f%%", n_objects, len(rows), stats.computed, stats.reused, 100 * agree)
    return {"objects": n_objects, "label_agreement": agree}


def main(argv: list[str] | None = None) -> None:
    params, args = parse("discover", ["images", "features", "encoder", "out", "coco"], argv)
    discover_flow(params.discover, args.images, args.features, args.encoder, args.out, args.coco)


if __name__ == "__main__":
    main(sys.argv[1:])
