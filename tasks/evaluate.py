"""Metrics: CorLoc, class-agnostic COCO AP (pycocotools), prompt alignment."""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
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
    from mirage.images import encode_mask

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


def discovered_boxes(backbone, images: np.ndarray, sizes: list[tuple[int, int]], cfg) -> list[dict[str, np.ndarray]]:
    """Objects discovered in a batch: `images` uint8 B x S x S x 3 at the
    backbone's input size, `sizes` each image's own (height, width), `cfg` a
    Discover section.  Per image, boxes (x, y, w, h) in its own pixels, best
    cut first, with their scores (1 - the cut's eigenvalue)."""
    return discovered_by_methods(backbone, images, sizes, [cfg])[0]


def discovered_by_methods(backbone, images: np.ndarray, sizes: list[tuple[int, int]], cfgs: list) -> list[list[dict]]:
    """`discovered_boxes` for several Discover sections (TokenCut and MaskCut)
    on one computation of the patch features: one list of images per section."""
    from tasks.discover import cut_to_object, discover_objects

    patches, grid = backbone.patches(images)
    out: list[list[dict]] = [[] for _ in cfgs]
    for feats, (h, w) in zip(patches, sizes):
        for found, cfg in zip(out, cfgs):
            cuts = discover_objects(feats, grid, cfg)
            found.append({"boxes": np.array([cut_to_object(c, h, w)[1] for c in cuts], dtype=np.float64).reshape(-1, 4),
                          "scores": np.array([1.0 - c.eigenvalue for c in cuts])})
    return out


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


def draw_grid(images: np.ndarray, gt: list, found: list, pred: list, scale: int = 4, cols: int = 8) -> bytes:
    """PNG of images with ground truth (green), discovered (yellow) and detected (red) boxes."""
    from PIL import Image, ImageDraw

    tiles = []
    for img, g, f, p in zip(images, gt, found, pred):
        tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for color, boxes in (("lime", g), ("yellow", f), ("red", p)):
            for x, y, w, h in boxes:
                draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=color)
        tiles.append(np.asarray(tile))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[r : r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()
