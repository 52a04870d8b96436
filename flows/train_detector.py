"""Stage train_detector: Faster R-CNN on the discovered pseudo-boxes of generated images."""
from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from mirage.checkpoint import Checkpoints, data_key
from mirage.images import decode_mask, decode_png, encode_mask
from mirage.params import Runner, TrainDetector
from mirage.stage import LossProgress, command, parse
from mirage.store import atomic_dir, read_table
from tasks.train_detector import as_mask, merge_predictions, predict, save_detector, train


def pseudo_labelled(images_dir: str, objects_dir: str, classes: list[str] | None,
                    imported_dir: str | None = None) -> tuple[np.ndarray, list[dict], list[str]]:
    """Images with their discovered boxes (images without a box are skipped),
    generated then imported, and each one's source.  Labels: 1 for every box
    (class-agnostic) or, given `classes`, the generating prompt's class where
    known, else the zero-shot label.  Images of another size than the first
    are resized to it, their boxes and masks with them."""
    labelled: dict[str, dict] = {}
    for r in read_table(objects_dir, columns=["image_id", "prompt_class", "objects"]).to_pylist():
        found = [o for o in r["objects"] if o["box"][2] > 0 and o["box"][3] > 0]
        if not found:
            continue
        def label(o: dict) -> int:
            if classes is None:
                return 1
            known = r["prompt_class"] in classes
            name = r["prompt_class"] if known and (len(found) == 1 or o["label"] not in classes) else o["label"]
            if name not in classes:
                raise ValueError(f"image {r['image_id']}: object labelled {name!r}, not one of discover.classes "
                                 "(class_aware needs an encoder with a text tower or prompt classes)")
            return classes.index(name) + 1
        labelled[r["image_id"]] = {"boxes": [o["box"] for o in found], "labels": [label(o) for o in found],
                                   "masks": [o["mask"] for o in found]}
    tables = [("generated", images_dir)] + ([("imported", imported_dir)] if imported_dir else [])
    rows = [(name, r) for name, table in tables for r in read_table(table, columns=["id", "image"]).to_pylist()
            if r["id"] in labelled]
    if not rows:
        raise ValueError(f"no image of {', '.join(t for _, t in tables)} has a discovered object in {objects_dir}")
    images = [decode_png(r["image"]) for _, r in rows]
    items = [labelled[r["id"]] for _, r in rows]
    size = images[0].shape[:2]
    for i, image in enumerate(images):
        if image.shape[:2] != size:
            images[i], items[i] = resized(image, items[i], size)
    return np.stack(images), items, [name for name, _ in rows]


def resized(image: np.ndarray, item: dict, size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """An image brought to `size` (h, w), its boxes scaled and its masks resized with it."""
    from PIL import Image

    h, w = image.shape[:2]
    sy, sx = size[0] / h, size[1] / w
    out = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    boxes = [[x * sx, y * sy, bw * sx, bh * sy] for x, y, bw, bh in item["boxes"]]
    masks = [encode_mask(np.asarray(Image.fromarray(decode_mask(m, h, w)).resize((size[1], size[0]), Image.NEAREST)))
             for m in item["masks"]]
    return out, {**item, "boxes": boxes, "masks": masks}


def mix_weights(sources: list[str], mix: dict[str, float]) -> tuple[np.ndarray, np.ndarray | None]:
    """Which images train (their source's share is > 0) and each one's chance
    to be drawn: `mix` shares split evenly over each source's images.  None
    when one source remains (uniform draws, as with generated images alone)."""
    share = np.array([mix.get(s, 0.0) for s in sources])
    keep = np.flatnonzero(share > 0)
    if not len(keep):
        raise ValueError(f"train_detector.mix gives no share to the sources with objects ({sorted(set(sources))})")
    kept = [sources[i] for i in keep]
    if len(set(kept)) == 1:
        return keep, None
    counts = {s: kept.count(s) for s in set(kept)}
    p = np.array([mix[s] / counts[s] for s in kept])
    return keep, p / p.sum()


def paste_pool(labelled: list[dict], size: tuple[int, int]) -> list[tuple[int, np.ndarray, int]]:
    """Every discovered object as (image index, bool mask, label), for copy-paste."""
    return [(i, as_mask(rle, size), label) for i, item in enumerate(labelled)
            for rle, label in zip(item["masks"], item["labels"])]


@flow(name="train_detector")
def train_detector_flow(cfg: TrainDetector, classes: list[str], images: str, objects: str, out: str,
                        runner: Runner = Runner(), imported: str | None = None) -> list[float]:
    """Round 0 on the discovered boxes of generated and imported images (in
    the shares of `train_detector.mix`), then one self-training round per
    score in cfg.self_train_scores, on the same images (transductive on the
    imported ones).  Saves every round under OUT/round-K."""
    log = get_run_logger()
    data, labelled, sources = pseudo_labelled(images, objects, classes if cfg.class_aware else None, imported)
    keep, probs = mix_weights(sources, cfg.mix)
    if len(keep) < len(data):
        data, labelled = data[keep], [labelled[i] for i in keep]
    counts = {s: sources.count(s) for s in sorted(set(sources))}
    log.info("images with discovered objects: %s; drawn in shares %s", counts,
             {s: cfg.mix.get(s, 0.0) for s in counts})
    pool = paste_pool(labelled, data.shape[1:3]) if cfg.copy_paste else None
    num_classes = len(classes) if cfg.class_aware else 1
    rounds = [(cfg.steps, None), *[(cfg.self_train_steps, s) for s in cfg.self_train_scores]]
    model, finals = None, []
    checkpoints = Checkpoints("train_detector", data_key(cfg.digest(), classes, data, labelled), runner.checkpoint_every)
    with atomic_dir(out) as tmp:
        for r, (steps, score) in enumerate(rounds):
            if score is not None:
                labelled = merge_predictions(labelled, predict(model, data), score)
            log.info("round %d: %d images, %d boxes, %d steps", r, len(data), sum(len(x["boxes"]) for x in labelled), steps)
            with LossProgress(steps, f"train_detector round {r}") as on_step:
                model, dcfg = train(cfg, data, labelled, on_step, steps=steps, start=model, num_classes=num_classes,
                                    paste_pool=pool, checkpoints=checkpoints, round_=r, probs=probs)
            if r in checkpoints.resumed:
                log.info("round %d: resumed from its checkpoint at step %d of %d", r, checkpoints.resumed[r], steps)
            save_detector(model, dcfg, tmp / f"round-{r}")
            finals.append(on_step.mean())
            log.info("round %d: loss %.3f -> %.3f", r, on_step.losses[0], finals[-1])
    checkpoints.clear()  # the model is in place
    return finals


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("train_detector", ["images", "imported", "objects", "out"], argv)
    return train_detector_flow(params.train_detector, list(params.discover.classes), args.images, args.objects, args.out,
                               params.runner, args.imported)


if __name__ == "__main__":
    command(main)
