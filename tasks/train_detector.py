"""A small torchvision Faster R-CNN (or Mask R-CNN) trained on pseudo-labels.

The toy profile's backbone is four convolutions (stride 4): a train step at
64 px costs ~0.5 s on 2 CPU cores where MobileNetV3-FPN costs 3.7 s.
"""
from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from mirage.data.images import decode_mask, decode_png, encode_mask
from mirage.data.params import TrainDetector
from mirage.data.store import atomic_dir, read_table
from mirage.models.devices import MODEL_BUILD, TorchRNG


@dataclass(frozen=True)
class DetectorConfig:
    """What rebuilds the architecture at load time (saved next to the weights)."""

    num_classes: int = 2        # background + "object": class-agnostic
    min_size: int = 64
    width: int = 64
    head_width: int = 256
    drop_loss_iou: float | None = 0.01  # DropLoss threshold; None trains plain Faster R-CNN
    masks: bool = False         # Mask R-CNN: a mask head learns the discovered masks


class DropLossRoIHeads(RoIHeads):
    """CutLER's DropLoss: a proposal whose IoU with every pseudo-box is <= `drop_iou`
    gets no loss (it is ignored, not background): it may be an object discovery missed."""

    drop_iou: float = 0.01

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        for props, gts, labs in zip(proposals, gt_boxes, labels):
            if gts.numel():
                best = box_iou(gts, props).max(0).values
                labs[(best <= self.drop_iou) & (labs == 0)] = -1  # -1: skipped by the sampler
        return matched, labels


class RoIAlignByImages(MultiScaleRoIAlign):
    """torchvision's RoIAlign pooler; when no gradient is wanted (predictions) on
    the CPU, the batch's images go through it a few at a time on
    `torch.get_num_threads()` threads at once: its CPU kernel runs on one core,
    and it was half of evaluate's time (6 of 12.6 s predicting 1,200 images).
    Each box is pooled on its own, so the output is the same bytes."""

    IMAGES_AT_ONCE = 8  # smaller pieces: the kernel's output stays small enough to reuse (64 at once: 160 MB)
    _pool: ThreadPoolExecutor | None = None

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]):
        threads = torch.get_num_threads()
        if (torch.is_grad_enabled() or self.scales is None or threads < 2 or len(boxes) <= self.IMAGES_AT_ONCE
                or boxes[0].device.type != "cpu"):  # the first call sets the scales, in this thread
            return super().forward(x, boxes, image_shapes)
        if RoIAlignByImages._pool is None or RoIAlignByImages._pool._max_workers != threads:
            RoIAlignByImages._pool = ThreadPoolExecutor(threads, thread_name_prefix="mirage-roialign")
        pieces = [slice(i, i + self.IMAGES_AT_ONCE) for i in range(0, len(boxes), self.IMAGES_AT_ONCE)]
        pooled = RoIAlignByImages._pool.map(
            lambda s: super(RoIAlignByImages, self).forward({k: v[s] for k, v in x.items()}, boxes[s], image_shapes[s]),
            pieces)
        return torch.cat(list(pooled))


def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build_detector(cfg: DetectorConfig) -> FasterRCNN:
    with MODEL_BUILD:  # not beside another thread's diffusers load (mirage/models/devices.py)
        return _build_detector(cfg)


def _build_detector(cfg: DetectorConfig) -> FasterRCNN:
    w = cfg.width
    backbone = nn.Sequential(conv(3, w // 2, 1), conv(w // 2, w, 2), conv(w, w, 1), conv(w, 2 * w, 2))
    backbone.out_channels = 2 * w
    # object sizes seen at min_size px: 10-18 px toy objects upsampled 2x -> 20-36 px
    anchors = AnchorGenerator(sizes=((12, 20, 32, 48),), aspect_ratios=((0.5, 1.0, 2.0),))
    # Sizes below torchvision's defaults (2000 proposals, 512 RoIs, a 1024-wide
    # head) because a toy image holds at most a few objects: the default head alone
    # costs ~3.5 s per batch of 16 on 2 CPU cores, these settings ~0.5 s.
    extra = {}
    if cfg.masks:
        extra = {"mask_roi_pool": RoIAlignByImages(["0"], output_size=14, sampling_ratio=2),
                 "mask_head": MaskRCNNHeads(2 * w, [w, w], 1),
                 "mask_predictor": MaskRCNNPredictor(w, w, cfg.num_classes)}
    model = (MaskRCNN if cfg.masks else FasterRCNN)(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=RoIAlignByImages(["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(2 * w * 7 * 7, cfg.head_width),
        box_predictor=FastRCNNPredictor(cfg.head_width, cfg.num_classes),
        min_size=cfg.min_size,
        max_size=cfg.min_size,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=64,
        box_detections_per_img=20,
        **extra,
    )
    if cfg.drop_loss_iou is not None:
        model.roi_heads.__class__ = DropLossRoIHeads  # same state, one method overridden
        model.roi_heads.drop_iou = cfg.drop_loss_iou
    return model


def to_targets(labelled: list[dict], size: tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per image {"boxes": (x, y, w, h) px, "labels": class ids from 1, and
    with `size` (H, W) "masks": COCO RLE strings or bool arrays} -> torchvision
    targets with (x1, y1, x2, y2) boxes (and uint8 N x H x W masks)."""
    out = []
    for item in labelled:
        b = torch.tensor(item["boxes"], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        target = {"boxes": b, "labels": torch.tensor(item["labels"], dtype=torch.int64).reshape(-1)}
        if size is not None:
            target["masks"] = torch.from_numpy(np.stack([as_mask(m, size) for m in item["masks"]]).astype(np.uint8)
                                               if item["masks"] else np.zeros((0, *size), dtype=np.uint8))
        out.append(target)
    return out


def as_mask(m, size: tuple[int, int]) -> np.ndarray:
    from mirage.data.images import decode_mask

    return decode_mask(m, *size) if isinstance(m, str) else np.asarray(m, dtype=bool)


def train(
    cfg: TrainDetector,
    images: np.ndarray,
    labelled: list[dict],
    on_step: Callable[[int, float], None] | None = None,
    steps: int | None = None,
    start: FasterRCNN | None = None,
    num_classes: int = 1,
    paste_pool: list[tuple[int, np.ndarray, int]] | None = None,
    checkpoints=None,
    round_: int = 0,
    probs: np.ndarray | None = None,
) -> tuple[FasterRCNN, DetectorConfig]:
    """images: uint8 N x H x W x 3; labelled: per image {"boxes": list of
    (x, y, w, h) px, "labels": class ids 1..num_classes}.  num_classes 1 is
    class-agnostic.  `start` continues from a trained model (self-training).
    With cfg.copy_paste > 0, each image of a batch receives, with that
    probability, one object of `paste_pool` ((image index, bool mask, label):
    the discovered masks) at a random place.  `checkpoints` (mirage.models.checkpoint):
    resume round `round_` from its last checkpoint, and save new ones.
    `probs`: each image's chance to be drawn (None: uniform).  With
    cfg.scale_jitter (lo, hi), each batch is seen at a random size in
    [lo, hi] x min_size (torchvision's multi-scale training)."""
    steps = steps or cfg.steps
    # torch's draws (the initial weights, torchvision's RPN and RoI samplers, scale jitter) from a stream of
    # their own: a stage beside this one (discover_splits' random-weight baseline) seeds the global RNG
    torch_rng = TorchRNG(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dcfg = DetectorConfig(num_classes=num_classes + 1, min_size=cfg.min_size, drop_loss_iou=cfg.drop_loss_iou,
                          masks=cfg.masks)
    with torch_rng:
        model = build_detector(dcfg)
    if start is not None:
        model.load_state_dict(start.state_dict())
    if cfg.scale_jitter:
        lo, hi = (round(cfg.min_size * f) for f in cfg.scale_jitter)
        model.transform.min_size = tuple(range(lo, hi + 1, 8))
        model.transform.max_size = max(model.transform.min_size)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    # linear warmup over the first 1/10 of the steps, then cosine decay to 0
    sched = get_cosine_schedule_with_warmup(opt, max(steps // 10, 1), steps)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    width = images.shape[2]
    parts = {"model": model, "optimizer": opt, "schedule": sched}
    with torch_rng:  # a checkpoint holds the torch stream's state
        first = checkpoints.resume(round_, parts, rng, on_step) if checkpoints else 0
    for step in range(first, steps):
        idx = rng.integers(0, len(images), cfg.batch_size) if probs is None else rng.choice(len(images), cfg.batch_size, p=probs)
        targets = to_targets([labelled[i] for i in idx], images.shape[1:3] if cfg.masks else None)
        batch = data[idx]  # a copy: pasting below leaves `data` alone
        if cfg.copy_paste and paste_pool:
            for j in np.flatnonzero(rng.random(len(idx)) < cfg.copy_paste):
                src, mask, label = paste_pool[rng.integers(len(paste_pool))]
                targets[j] = paste_object(batch[j], targets[j], data[src], mask, label, rng)
        for j in np.flatnonzero(rng.random(len(idx)) < 0.5):  # horizontal flip, boxes with it
            batch[j] = batch[j].flip(-1)
            b = targets[j]["boxes"]
            targets[j]["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
            if "masks" in targets[j]:
                targets[j]["masks"] = targets[j]["masks"].flip(-1)
        with torch_rng:
            losses = model(list(batch), targets)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_step:
            on_step(step, loss.item())
        if checkpoints:
            with torch_rng:
                checkpoints.step_done(round_, step + 1, steps, parts, rng, on_step)
    model.transform.min_size, model.transform.max_size = (dcfg.min_size,), dcfg.min_size  # inference at min_size
    return model.eval(), dcfg


def paste_object(image: torch.Tensor, target: dict[str, torch.Tensor], source: torch.Tensor, mask: np.ndarray,
                 label: int, rng: np.random.Generator, occluded: float = 0.7) -> dict[str, torch.Tensor]:
    """Copy-paste augmentation: the masked object of `source` (3 x H x W) goes
    to a random place in `image` (changed in place); its box joins the target
    and a box the paste covers by more than `occluded` of its area leaves it."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    height, width = image.shape[1:]
    oy, ox = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    m = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1]))
    region = image[:, oy : oy + h, ox : ox + w]
    region[:, m] = source[:, y0:y1, x0:x1][:, m]
    pasted = torch.zeros(height, width)
    pasted[oy : oy + h, ox : ox + w] = m.float()
    keep = []
    for bx0, by0, bx1, by1 in target["boxes"].round().int().tolist():
        area = max((bx1 - bx0) * (by1 - by0), 1)
        keep.append(float(pasted[by0:by1, bx0:bx1].sum()) / area <= occluded)
    keep_t = torch.tensor(keep, dtype=torch.bool)
    box = torch.tensor([[ox, oy, ox + w, oy + h]], dtype=torch.float32)
    out = {"boxes": torch.cat([target["boxes"][keep_t], box]),
           "labels": torch.cat([target["labels"][keep_t], torch.tensor([label], dtype=torch.int64)])}
    if "masks" in target:  # what the paste covers leaves the masks under it
        under = target["masks"][keep_t] * (pasted == 0).to(torch.uint8)
        out["masks"] = torch.cat([under, pasted.to(torch.uint8)[None]])
    return out


@torch.inference_mode()
def predict(model: FasterRCNN, images, batch_size: int = 64) -> list[dict[str, np.ndarray]]:
    """images: uint8 N x H x W x 3, or a list of H x W x 3 of any sizes.
    Per image: boxes (x, y, w, h) px, scores and labels (class ids from 1), best first."""
    model.eval()
    data = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images]  # copy: PIL arrays are read-only
    out = []
    for start in range(0, len(data), batch_size):
        for det in model(data[start : start + batch_size]):
            b = det["boxes"].numpy().copy()
            b[:, 2:] -= b[:, :2]
            item = {"boxes": b, "scores": det["scores"].numpy(), "labels": det["labels"].numpy()}
            if "masks" in det:  # Mask R-CNN: N x 1 x H x W probabilities -> bool N x H x W
                item["masks"] = det["masks"][:, 0].numpy() >= 0.5
            out.append(item)
    return out


WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_detector(model, dcfg: DetectorConfig, out: str | Path) -> None:
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(dataclasses.asdict(dcfg), indent=2))


def load_detector(path: str | Path):
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"detector {path}: no {WEIGHTS} (run stage train_detector)")
    model = build_detector(DetectorConfig(**json.loads((path / CONFIG).read_text())))
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    return model.eval()


def merge_predictions(labelled: list[dict], detections: list[dict[str, np.ndarray]], score: float,
                      max_iou: float = 0.5) -> list[dict]:
    """Self-training labels: each image's boxes plus its detections scoring >= `score`
    that overlap none of them (IoU < max_iou), with their predicted labels."""
    merged = []
    for known, det in zip(labelled, detections):
        boxes, labels = [list(b) for b in known["boxes"]], list(known["labels"])
        masks = list(known["masks"]) if "masks" in known and "masks" in det else None
        keep = np.flatnonzero(det["scores"] >= score)
        for k in keep:
            b, lab = det["boxes"][k], det["labels"][k]
            if not boxes or box_iou(_xyxy([b]), _xyxy(boxes)).max() < max_iou:
                boxes.append([float(v) for v in b])
                labels.append(int(lab))
                if masks is not None:
                    masks.append(det["masks"][k])
        merged.append({"boxes": boxes, "labels": labels} | ({"masks": masks} if masks is not None else {}))
    return merged


def _xyxy(boxes) -> torch.Tensor:
    b = torch.tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def pseudo_labelled(images_dir: str, objects_dir: str, classes: list[str] | None,
                    imported_dir: str | None = None, drop_spanning: bool = False,
                    only: set[str] | None = None) -> tuple[np.ndarray, list[dict], list[str]]:
    """Images with their discovered boxes (images without a box are skipped),
    generated then imported, and each one's source.  Labels: 1 for every box
    (class-agnostic) or, given `classes`, the generating prompt's class where
    known, else the zero-shot label.  With `drop_spanning`, a box as wide or
    as tall as its image is no pseudo-label (a cut of the background: see
    TrainDetector.drop_spanning).  Images of another size than the first are
    resized to it, their boxes and masks with them.  `only`: these image ids
    alone (a subset, as benchmarks/curate_pays.py compares)."""
    labelled: dict[str, dict] = {}
    for r in read_table(objects_dir, columns=["image_id", "prompt_class", "objects"]).to_pylist():
        if only is not None and r["image_id"] not in only:
            continue
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
    rows = [(name, r) for name, table in tables
            for r in read_table(table, columns=["id", "image", "width", "height"]).to_pylist() if r["id"] in labelled]
    if drop_spanning:
        for _, r in rows:
            item = labelled[r["id"]]
            keep = [k for k, (_, _, w, h) in enumerate(item["boxes"]) if w < r["width"] and h < r["height"]]
            labelled[r["id"]] = {key: [values[k] for k in keep] for key, values in item.items()}
        rows = [(name, r) for name, r in rows if labelled[r["id"]]["boxes"]]
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
