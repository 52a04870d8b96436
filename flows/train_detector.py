"""Stage train_detector: Faster R-CNN on the discovered pseudo-boxes of generated images."""
from __future__ import annotations

import sys

import numpy as np
from prefect import flow, get_run_logger

from mirage.images import decode_png
from mirage.params import TrainDetector
from mirage.stage import parse, progress
from mirage.store import read_table
from tasks.train_detector import save_detector, train

def pseudo_labelled(images_dir: str, objects_dir: str) -> tuple[np.ndarray, list[list[list[float]]]]:
    """Generated images with their discovered boxes (images without a box are skipped)."""
    boxes: dict[str, list[list[float]]] = {}
    for o in read_table(objects_dir, columns=["image_id", "box"]).to_pylist():
        if o["box"][2] > 0 and o["box"][3] > 0:
            boxes.setdefault(o["image_id"], []).append(o["box"])
    rows = [r for r in read_table(images_dir, columns=["id", "image"]).to_pylist() if r["id"] in boxes]
    return np.stack([decode_png(r["image"]) for r in rows]), [boxes[r["id"]] for r in rows]


@flow(name="train_detector")
def train_detector_flow(cfg: TrainDetector, images: str, objects: str, out: str) -> float:
    log = get_run_logger()
    data, boxes = pseudo_labelled(images, objects)
    log.info("training on %d images, %d pseudo-boxes, %d steps", len(data), sum(map(len, boxes)), cfg.steps)
    losses: list[float] = []
    with progress(cfg.steps, "train_detector") as bar:
        def on_step(step: int, loss: float) -> None:
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        model, dcfg = train(cfg, data, boxes, on_step)
    save_detector(model, dcfg, out)
    final = float(np.mean(losses[-20:]))
    log.info("saved %s (final loss %.3f, first %.3f)", out, final, losses[0])
    return final


def main(argv: list[str] | None = None) -> None:
    params, args = parse("train_detector", ["images", "objects", "out"], argv)
    train_detector_flow(params.train_detector, args.images, args.objects, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
