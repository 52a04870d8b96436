"""Stage train_detector: Faster R-CNN on the discovered pseudo-boxes of generated images."""
from __future__ import annotations

import numpy as np
from prefect import flow, get_run_logger

from mirage.checkpoint import Checkpoints, data_key
from mirage.images import decode_mask, decode_png
from mirage.params import Runner, TrainDetector
from mirage.stage import LossProgress, command, parse
from mirage.store import atomic_dir, read_table
from tasks.train_detector import merge_predictions, predict, save_detector, train


def pseudo_labelled(images_dir: str, objects_dir: str, classes: list[str] | None) -> tuple[np.ndarray, list[dict]]:
    """Generated images with their discovered boxes (images without a box are
    skipped).  Labels: 1 for every box (class-agnostic) or, given `classes`,
    the generating prompt's class where known, else the zero-shot label."""
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
    rows = [r for r in read_table(images_dir, columns=["id", "image"]).to_pylist() if r["id"] in labelled]
    return np.stack([decode_png(r["image"]) for r in rows]), [labelled[r["id"]] for r in rows]


def paste_pool(labelled: list[dict], size: tuple[int, int]) -> list[tuple[int, np.ndarray, int]]:
    """Every discovered object as (image index, bool mask, label), for copy-paste."""
    return [(i, decode_mask(rle, *size), label) for i, item in enumerate(labelled)
            for rle, label in zip(item["masks"], item["labels"])]


@flow(name="train_detector")
def train_detector_flow(cfg: TrainDetector, classes: list[str], images: str, objects: str, out: str,
                        runner: Runner = Runner()) -> list[float]:
    """Round 0 on the discovered boxes, then one self-training round per score in
    cfg.self_train_scores.  Saves every round under OUT/round-K."""
    log = get_run_logger()
    data, labelled = pseudo_labelled(images, objects, classes if cfg.class_aware else None)
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
                                    paste_pool=pool, checkpoints=checkpoints, round_=r)
            if r in checkpoints.resumed:
                log.info("round %d: resumed from its checkpoint at step %d of %d", r, checkpoints.resumed[r], steps)
            save_detector(model, dcfg, tmp / f"round-{r}")
            finals.append(on_step.mean())
            log.info("round %d: loss %.3f -> %.3f", r, on_step.losses[0], finals[-1])
    checkpoints.clear()  # the model is in place
    return finals


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("train_detector", ["images", "objects", "out"], argv)
    return train_detector_flow(params.train_detector, list(params.discover.classes), args.images, args.objects, args.out,
                               params.runner)


if __name__ == "__main__":
    command(main)
