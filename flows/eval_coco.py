"""`mirage eval-coco`: a detector's (and discovery's) class-agnostic metrics on any COCO-format set on disk.

Not a DVC stage: a command on the project's models, with the same evaluation
code as the evaluate stage (tasks/evaluate.py, tasks/coco_dataset.py).
"""
from __future__ import annotations

from pathlib import Path

from mirage.data import params as params_mod
from mirage.models.devices import resolve_device
from mirage.models.encoders import load_encoder
from mirage.models.fingerprint import encoder_spec, under
from mirage.models.patch_backbones import backbone_input_size, load_patch_backbone
from tasks.coco_dataset import evaluate_detector, evaluate_discovery, load_coco
from tasks.train_detector import load_detector


def last_round(detector: Path) -> Path:
    """A saved detector, or the last round-K of a train_detector output."""
    rounds = sorted(detector.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    return rounds[-1] if rounds and not (detector / "model.safetensors").exists() else detector


def coco_discovery(root: Path, items) -> dict:
    """Discovery CorLoc/AP on the dataset with the project's configured patch
    backbone (`features.*`, `generate.model`) and `discover.*`."""
    p = params_mod.load(root / "params.yaml")
    encoder = load_encoder(encoder_spec(under(root, p.features.encoder)), resolve_device(p.features.device))
    backbone = load_patch_backbone(p.features.patch_backbone, encoder, under(root, p.generate.model),
                                   concepts=root / "data" / "concepts")
    size = backbone_input_size(backbone)
    stats = evaluate_discovery(backbone, size, items, p.discover, p.evaluate.iou)
    return {"backbone": p.features.patch_backbone, "encoder": p.features.encoder, "method": p.discover.method,
            "input_size": size, **stats}


def eval_coco(root: Path, annotations: str, images: str, detector: str, discovery: bool, score_thresh: float) -> dict:
    items = load_coco(annotations, images)
    result: dict = {"dataset": str(annotations), "images": len(items)}
    if discovery:
        result["discovery"] = coco_discovery(root, items)
    if detector != "none":
        path = last_round(Path(detector))
        result["detector"] = str(path)
        result |= {k.lower(): v for k, v in evaluate_detector(load_detector(path), items, score_thresh).items()}
    return result
