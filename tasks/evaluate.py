"""Metrics: CorLoc, class-agnostic COCO AP (pycocotools), prompt alignment."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mirage.images import box_iou


def corloc(pred_boxes: list[list[float]], gt_boxes: list[list[list[float]]], iou: float = 0.5) -> float:
    """Share of images whose (top) predicted box has IoU >= iou with any ground-truth box.
    Boxes are (x, y, w, h) px; an image with no prediction counts as a miss."""
    hits = [
        bool(len(gt) and p[2] > 0 and p[3] > 0 and box_iou(np.array([p]), np.array(gt)).max() >= iou)
        for p, gt in zip(pred_boxes, gt_boxes)
    ]
    return float(np.mean(hits)) if hits else 0.0


def coco_detection(
    gt_boxes: list[list[list[float]]],
    detections: list[dict[str, np.ndarray]],
    sizes: tuple[int, int] | list[tuple[int, int]],
) -> tuple[dict[str, float], np.ndarray]:
    """Class-agnostic COCO evaluation; `sizes` is (h, w) for all images or one per image.
    Returns {AP, AP50, AP75, AR100} and the precision at IoU 0.5 over the 101
    recall points (for a PR curve)."""
    if isinstance(sizes, tuple):
        sizes = [sizes] * len(gt_boxes)
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": w, "height": h} for i, (h, w) in enumerate(sizes)],
        "categories": [{"id": 1, "name": "object"}],
        "annotations": [
            {"id": n, "image_id": i, "category_id": 1, "bbox": list(map(float, b)), "area": float(b[2] * b[3]), "iscrowd": 0}
            for n, (i, b) in enumerate(((i, b) for i, boxes in enumerate(gt_boxes) for b in boxes), start=1)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = [
        {"image_id": i, "category_id": 1, "bbox": list(map(float, b)), "score": float(s)}
        for i, det in enumerate(detections) for b, s in zip(det["boxes"], det["scores"])
    ]
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0}, np.zeros(101)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    # precision[T, R, K, A, M]: IoU 0.5, all recalls, the one class, area "all", maxDets 100
    pr = ev.eval["precision"][0, :, 0, 0, -1]
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]), "AR100": float(s[8])}, np.clip(pr, 0, None)


def prompt_alignment(image_emb: np.ndarray, text_emb: np.ndarray, prompted: list[int]) -> float:
    """Share of images whose zero-shot class (nearest class text embedding) is the prompted one."""
    if len(prompted) == 0:
        return 0.0
    return float(np.mean((image_emb @ text_emb.T).argmax(1) == np.asarray(prompted)))
