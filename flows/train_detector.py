"""Stage train_detector: Faster R-CNN on the discovered pseudo-boxes of generated images."""
from __future__ import annotations

import sys

import numpy as np
from prefect import flow, get_run_logger

from mirage.images import decode_png
from mirage.params import TrainDetector
from mirage.stage import parse, progress
from mirage.store import atomic_dir, read_table
from tasks.train_detector import merge_predictions, predict, save_detector, train

def pseudo_labelled(images_dir: str, objects_dir: str) -> tuple[np.ndarray, list[list[list[float]]]]:
    """Generated images with their discovered boxes (images without a box are skipped)."""
    boxes: dict[str, list[list[float]]] = {}
    for r in read_table(objects_dir, columns=["image_id", "objects"]).to_pylist():
        found = [o["box"] for o in r["objects"] if o["box"][2] > 0 and o["box"][3] > 0]
        if found:
            boxes[r["image_id"]] = found
    rows = [r for r in read_table(images_dir, columns=["id", "image"]).to_pylist() if r["id"] in boxes]
    return np.stack([decode_png(r["image"]) for r in rows]), [boxes[r["id"]] for r in rows]


@flow(name="train_detector")
def train_detector_flow(cfg: TrainDetector, images: str, objects: str, out: str) -> list[float]:
    """Round 0 on the discovered boxes, then one self-training round per score in
    cfg.self_train_scores.  Saves every round under OUT/round-K."""
    log = get_run_logger()
    data, boxes = pseudo_labelled(images, objects)
    rounds = [(cfg.steps, None), *[(cfg.self_train_steps, s) for s in cfg.self_train_scores]]
    model, finals = None, []
    with atomic_dir(out) as tmp:
        for r, (steps, score) in enumerate(rounds):
            if score is not None:
                boxes = merge_predictions(boxes, predict(model, data), score)
            log.info("round %d: %d images, %d boxes, %d steps", r, len(data), sum(map(len, boxes)), steps)
            losses: list[float] = []
            with progress(steps, f"train_detector round {r}") as bar:
                def on_step(step: int, loss: float) -> None:
                    losses.append(loss)
                    bar.update(1)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                model, dcfg = train(cfg, data, boxes, on_step, steps=steps, start=model)
            save_detector(model, dcfg, tmp / f"round-{r}")
            finals.append(float(np.mean(losses[-20:])))
            log.info("round %d: loss %.3f -> %.3f", r, losses[0], finals[-1])
    return finals


def main(argv: list[str] | None = None) -> None:
    params, args = parse("train_detector", ["images", "objects", "out"], argv)
    train_detector_flow(params.train_detector, args.images, args.objects, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
