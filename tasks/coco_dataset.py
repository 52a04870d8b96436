"""Any COCO-format detection dataset on disk (VOC07 test, COCO val2017, ...)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CocoImage:
    id: int
    path: Path
    width: int
    height: int
    boxes: list[list[float]]  # (x, y, w, h) px, crowd regions left out
    categories: list[str]


def load_coco(annotations: str | Path, images_dir: str | Path) -> list[CocoImage]:
    """Read an annotation file; fail naming the file or the first missing image."""
    annotations, images_dir = Path(annotations), Path(images_dir)
    try:
        data = json.loads(annotations.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--annotations {annotations}: not a readable COCO JSON file ({err})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"--annotations {annotations}: no {key!r} list, not COCO detection format")
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            per_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for im in data["images"]:
        path = images_dir / im["file_name"]
        if not path.exists():
            raise FileNotFoundError(f"--images {images_dir}: {im['file_name']} (image id {im['id']}) not found")
        anns = per_image.get(im["id"], [])
        out.append(CocoImage(im["id"], path, im["width"], im["height"],
                             [list(map(float, a["bbox"])) for a in anns], [names[a["category_id"]] for a in anns]))
    return out


def read_images(items: list[CocoImage], batch: int = 32) -> Iterator[tuple[list[CocoImage], list[np.ndarray]]]:
    """Batches of (items, uint8 H x W x 3 arrays); images keep their own sizes."""
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        arrays = []
        for it in chunk:
            with Image.open(it.path) as img:
                arrays.append(np.asarray(img.convert("RGB")))
        yield chunk, arrays


def evaluate_detector(model, items: list[CocoImage], score_thresh: float = 0.05) -> dict[str, float]:
    """Class-agnostic COCO AP/AP50/AP75/AR100 of a detector on the dataset."""
    from tasks.evaluate import coco_detection
    from tasks.train_detector import predict

    detections = []
    for _, arrays in read_images(items):
        for det in predict(model, arrays):
            keep = det["scores"] >= score_thresh
            detections.append({k: v[keep] for k, v in det.items()})
    stats, _ = coco_detection([it.boxes for it in items], detections, [(it.height, it.width) for it in items])
    return stats


def discover_dataset(backbone, size: int, items: list[CocoImage], cfg) -> list[dict[str, np.ndarray]]:
    """Objects discovered in each image, boxes (x, y, w, h) in the image's own
    pixels, best cut first.  The whole image is resized to size x size (no crop,
    so every pixel maps back), cut on the backbone's patch grid (`cfg` is a
    Discover section), and the masks are mapped back to the original size."""
    from tasks.discover_splits import discovered_boxes

    out = []
    for chunk, arrays in read_images(items):
        resized = np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC)) for a in arrays])
        out += discovered_boxes(backbone, resized, [(it.height, it.width) for it in chunk], cfg)
    return out


def evaluate_discovery(backbone, size: int, items: list[CocoImage], cfg, iou: float = 0.5) -> dict[str, float]:
    """CorLoc of the top discovered box, and class-agnostic COCO AP of all of them."""
    from tasks.evaluate import discovery_metrics

    found = discover_dataset(backbone, size, items, cfg)
    return discovery_metrics(found, [it.boxes for it in items], [(it.height, it.width) for it in items], iou)
