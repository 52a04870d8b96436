"""Metrics: CorLoc, class-agnostic COCO AP (pycocotools), prompt alignment."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mirage.data.images import box_iou, decode_png, draw_grid
from mirage.data.params import Discover, Params
from mirage.data.store import read_table
from mirage.models.devices import resolve_device
from mirage.models.encoders import ImageEncoder, load_encoder
from mirage.models.fingerprint import encoder_spec
from tasks.quality import generation_quality, quality_png, scene_classes
from tasks.train_detector import load_detector, predict


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
    gt_labels: list[list[int]] | None = None,
    num_classes: int = 1,
) -> tuple[dict[str, float], np.ndarray]:
    """COCO box evaluation; `sizes` is (h, w) for all images or one per image.
    Class-agnostic unless `gt_labels` (class ids 1..num_classes per box) are
    given, in which case detections are matched by their "labels" too.
    Returns {AP, AP50, AP75, AR100} and the precision at IoU 0.5 over the 101
    recall points, averaged over classes (for a PR curve)."""
    if isinstance(sizes, tuple):
        sizes = [sizes] * len(gt_boxes)
    agnostic = gt_labels is None
    if agnostic:
        gt_labels = [[1] * len(boxes) for boxes in gt_boxes]
        num_classes = 1
    annotations = [
        {"image_id": i, "category_id": int(c), "bbox": list(map(float, b)), "area": float(b[2] * b[3]), "iscrowd": 0}
        for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)) for b, c in zip(boxes, labels)
    ]
    results = [
        {"image_id": i, "category_id": 1 if agnostic else int(c), "bbox": list(map(float, b)), "score": float(s)}
        for i, det in enumerate(detections)
        for b, s, c in zip(det["boxes"], det["scores"], det.get("labels", np.ones(len(det["boxes"]))))
    ]
    return _coco_eval(sizes, num_classes, annotations, results, "bbox")


def coco_segmentation(
    gt_masks: list[list[str]],
    detections: list[dict[str, np.ndarray]],
    sizes: tuple[int, int],
) -> tuple[dict[str, float], np.ndarray]:
    """Class-agnostic COCO mask evaluation: ground-truth masks as COCO RLE
    strings, detections with bool N x H x W "masks" and "scores"."""
    from mirage.data.images import encode_mask

    h, w = sizes

    def rle(counts: str) -> dict:
        return {"size": [h, w], "counts": counts}

    annotations = []
    for i, masks in enumerate(gt_masks):
        for m in masks:
            annotations.append({"image_id": i, "category_id": 1, "segmentation": rle(m), "iscrowd": 0,
                                "area": float(mask_utils.area(_bytes_rle(rle(m)))),
                                "bbox": list(map(float, mask_utils.toBbox(_bytes_rle(rle(m)))))})
    results = [
        {"image_id": i, "category_id": 1, "segmentation": rle(encode_mask(m)), "score": float(s)}
        for i, det in enumerate(detections) for m, s in zip(det["masks"], det["scores"])
    ]
    return _coco_eval([sizes] * len(gt_masks), 1, annotations, results, "segm")


def _bytes_rle(r: dict) -> dict:
    return {"size": r["size"], "counts": r["counts"].encode("ascii")}


def _coco_eval(sizes: list[tuple[int, int]], num_classes: int, annotations: list[dict], results: list[dict],
               iou_type: str) -> tuple[dict[str, float], np.ndarray]:
    """pycocotools on in-memory ground truth and results: {AP, AP50, AP75,
    AR100} and the precision at IoU 0.5 over 101 recall points (class mean)."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": w, "height": h} for i, (h, w) in enumerate(sizes)],
        "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)],
        "annotations": [{"id": n, **a} for n, a in enumerate(annotations, start=1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR100": 0.0}, np.zeros(101)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    s = ev.stats
    # precision[T, R, K, A, M]: IoU 0.5, all recalls, every class, area "all", maxDets 100
    pr = np.clip(ev.eval["precision"][0, :, :, 0, -1], 0, None).mean(1)
    return {"AP": float(s[0]), "AP50": float(s[1]), "AP75": float(s[2]), "AR100": float(s[8])}, pr


def prompt_alignment(image_emb: np.ndarray, text_emb: np.ndarray, prompted: list[int]) -> float:
    """Share of images whose zero-shot class (nearest class text embedding) is the prompted one."""
    if len(prompted) == 0:
        return 0.0
    return float(np.mean((image_emb @ text_emb.T).argmax(1) == np.asarray(prompted)))


def top_box(found: dict[str, np.ndarray]) -> list[float]:
    """The best discovered box, or an empty one (a CorLoc miss)."""
    return found["boxes"][0].tolist() if len(found["boxes"]) else [0.0, 0.0, 0.0, 0.0]


def discovery_metrics(found: list[dict[str, np.ndarray]], gt_boxes: list[list[list[float]]],
                      sizes: list[tuple[int, int]], iou: float = 0.5) -> dict[str, float]:
    """CorLoc of the top discovered box and class-agnostic COCO AP of all of them."""
    stats, _ = coco_detection(gt_boxes, found, sizes)
    return {"corloc": corloc([top_box(f) for f in found], gt_boxes, iou), **{k.lower(): v for k, v in stats.items()}}


def detector_metrics(model, detections: list[dict[str, np.ndarray]], gt_boxes, sizes, gt_labels=None,
                     gt_masks=None) -> tuple[dict, np.ndarray]:
    """One detector's class-agnostic COCO metrics (and class-aware ones for a
    head with several classes, mask AP for Mask R-CNN) and its PR curve."""
    coco, pr = coco_detection(gt_boxes, detections, sizes)
    result = {k.lower(): v for k, v in coco.items()}
    n_classes = model.roi_heads.box_predictor.cls_score.out_features - 1
    if n_classes > 1 and gt_labels is not None:
        aware, _ = coco_detection(gt_boxes, detections, sizes, gt_labels, n_classes)
        result["class_aware"] = {k.lower(): v for k, v in aware.items()}
    if gt_masks is not None and detections and "masks" in detections[0]:
        masked, _ = coco_segmentation(gt_masks, detections, sizes)
        result["mask"] = {k.lower(): v for k, v in masked.items()}
    return result, pr


def load_test_split(test: str, classes: list[str]) -> dict:
    """The ground truth: uint8 images N x H x W x 3, boxes (x, y, w, h px), masks (RLE), class ids."""
    scenes = read_table(test, columns=["image", "objects"]).to_pylist()
    return {
        "images": np.stack([decode_png(r["image"]) for r in scenes]),
        "boxes": [[o["box"] for o in r["objects"]] for r in scenes],
        "masks": [[o["mask"] for o in r["objects"]] for r in scenes],
        "labels": [[classes.index(o["class_name"]) + 1 if o["class_name"] in classes else 0 for o in r["objects"]]
                   for r in scenes],
    }


def split_boxes(path: str) -> dict[tuple[str, str, str], list[dict[str, np.ndarray]]]:
    """Stage discover_splits' Parquet file (schema.SPLIT_BOXES) as {(split,
    weights, method): per image in its split's order, its boxes and scores
    (tasks/discover_splits.py `discovered_boxes`)}, keys in the table's order
    (the configured method first)."""
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for r in sorted(pq.read_table(path).to_pylist(), key=lambda r: r["image"]):
        grouped.setdefault((r["split"], r["weights"], r["method"]), []).append(
            {"boxes": np.array(r["boxes"], dtype=np.float64).reshape(-1, 4), "scores": np.array(r["scores"])})
    return grouped


def found_in(boxes: dict, split: str, weights: str, method: str, n: int) -> list[dict[str, np.ndarray]]:
    """`split_boxes`' entry for `split`'s n images, or a clear error where the
    table was made for other splits or another method."""
    found = boxes.get((split, weights, method), [])
    if len(found) != n:
        raise ValueError(f"the split discovery holds {len(found)} {weights}-weight {method} rows of split "
                         f"{split!r}, not its {n} images: run stage discover_splits again (mirage run)")
    return found


def detector_rounds(detector: str, gt: dict, score_thresh: float) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Metrics and PR curve of every self-training round's detector, and the last round's detections."""
    rounds, curves, dets = [], [], []
    size = gt["images"].shape[1:3]
    for path in sorted(Path(detector).glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        model = load_detector(path)
        dets = [{k: v[d["scores"] >= score_thresh] for k, v in d.items()} for d in predict(model, gt["images"])]
        metrics, pr = detector_metrics(model, dets, gt["boxes"], size, gt["labels"], gt["masks"])
        rounds.append(metrics)
        curves.append(pr)
    if not rounds:
        raise FileNotFoundError(f"{detector} holds no round-K detector (run stage train_detector)")
    return rounds, curves, dets


def generation_alignment(encoder: ImageEncoder, images: str, features: str, cfg: Discover) -> tuple[float | None, int]:
    """Share of generated images whose zero-shot class (configured encoder's
    image embedding vs its text embeddings of the class prompts) is the
    prompted one; None for an image-only encoder."""
    classes = list(cfg.classes)
    gen = read_table(images, columns=["id", "class_name"]).to_pylist()
    if not encoder.has_text:
        return None, len(gen)
    emb = {r["id"]: r["embedding"] for r in read_table(features, columns=["id", "embedding"]).to_pylist()}
    with torch.inference_mode():
        text = encoder.encode_text([cfg.prompt_template.format(c) for c in classes]).float().cpu().numpy()
    known = [r for r in gen if r["class_name"] in classes and r["id"] in emb]  # failed items have no features
    image_emb = np.array([emb[r["id"]] for r in known], dtype=np.float32).reshape(len(known), -1)
    return prompt_alignment(image_emb, text, [classes.index(r["class_name"]) for r in known]), len(gen)


def pr_csv(curve: np.ndarray) -> bytes:
    """A PR curve (precision at 101 recall points) as the CSV `dvc plots` draws."""
    rows = "".join(f"{x:.2f},{p:.4f}\n" for x, p in zip(np.linspace(0, 1, 101), curve))
    return ("recall,precision\n" + rows).encode()


SIDE_BY_SIDE = ("ap", "ap50", "ap75", "ar100")  # the COCO measures compared per split: teacher vs detector


def evaluate(params: Params, test: str, images: str, features: str, detector: str, discovered: str,
             ood: str | None = None, reference: str | None = None,
             real: str | None = None) -> tuple[dict, list[np.ndarray], bytes, bytes]:
    """The metrics (test split and, when `ood` holds scenes, the ood split
    side by side), each round's PR curve, the example grid (PNG) and the
    distribution metrics' picture (PNG; `reference`: the features stage's
    sample of real images; `real`: their scenes, whose
    classes give the per-class measures).  `discovered`: stage
    discover_splits' table, the teacher's boxes on the splits."""
    cfg, dcfg, fcfg = params.evaluate, params.discover, params.features
    gt = load_test_split(test, list(dcfg.classes))
    splits = {"test": gt}
    if ood and read_table(ood, columns=["key"]).num_rows:
        splits["ood"] = load_test_split(ood, list(dcfg.classes))
    encoder = load_encoder(encoder_spec(fcfg.encoder), resolve_device(fcfg.device), fcfg.dtype)
    boxes = split_boxes(discovered)
    methods = tuple(m for split, weights, m in boxes if (split, weights) == ("test", "learned"))
    both = {name: {m: found_in(boxes, name, "learned", m, len(split["images"])) for m in methods}
            for name, split in splits.items()}
    random = found_in(boxes, "test", "random", dcfg.method, len(gt["images"]))
    learned = both["test"][dcfg.method]
    size = gt["images"].shape[1:3]
    found = discovery_metrics(learned, gt["boxes"], size, cfg.iou)
    rounds, curves, dets = detector_rounds(detector, gt, cfg.score_thresh)
    side_by_side = {}
    for name, split in splits.items():
        split_size = split["images"].shape[1:3]
        side_by_side[name] = {
            "images": len(split["images"]),
            "discovery": {m: {k: v for k, v in discovery_metrics(both[name][m], split["boxes"], split_size, cfg.iou).items()
                              if k in ("corloc", *SIDE_BY_SIDE)} for m in methods},
            "detector": [{k: r[k] for k in SIDE_BY_SIDE} for r in
                         (rounds if name == "test" else detector_rounds(detector, split, cfg.score_thresh)[0])],
        }
    alignment, n_generated = generation_alignment(encoder, images, features, dcfg)
    if reference and cfg.quality_n:
        classes_of = scene_classes(real) if real and cfg.reference == "toyworld" else {}
        quality = generation_quality(images, features, reference, classes_of, tuple(dcfg.classes), cfg.quality_n,
                                     cfg.quality_k, cfg.random_seed, cfg.quality_bootstrap)
        quality["reference"] = "toyworld train split" if cfg.reference == "toyworld" else "imported images"
        quality_plot = quality_png(quality, f"generated vs {quality['reference']} ({fcfg.encoder} embeddings)")
    else:
        quality, quality_plot = None, quality_png({}, "no distribution metrics (evaluate.quality_n: 0)")
    result = {
        "discovery": {"method": dcfg.method, "backbone": fcfg.patch_backbone, "encoder": fcfg.encoder,
                      "corloc": found["corloc"], "ap50": found["ap50"],
                      "corloc_random_weights": discovery_metrics(random, gt["boxes"], size, cfg.iou)["corloc"]},
        "detector": {**rounds[-1], "rounds": rounds},
        "generation": {"prompt_alignment": alignment, "images": n_generated, "quality": quality},
        "test_images": len(gt["images"]),
        "splits": side_by_side,
    }
    n = min(cfg.grid_images, len(gt["images"]))
    top = [[d["boxes"][0].tolist()] if len(d["boxes"]) else [] for d in dets[:n]]
    grid = draw_grid(gt["images"][:n], gt["boxes"][:n], [[top_box(f)] for f in learned[:n]], top)
    return result, curves, grid, quality_plot
