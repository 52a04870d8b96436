"""Stage evaluate: discovery CorLoc (learned vs random weights), detector AP per round, prompt alignment."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mirage.fingerprint import encoder_spec
from mirage.images import decode_png
from mirage.models import EncoderPatches, load_encoder, load_patch_backbone
from mirage.params import Discover, Params
from mirage.stage import parse
from mirage.store import atomic_write_bytes, atomic_write_json, read_table
from tasks.discover import cut_to_object, discover_objects
from tasks.evaluate import coco_detection, coco_segmentation, corloc, prompt_alignment
from tasks.train_detector import load_detector, predict


def discovery_boxes(backbone, images: np.ndarray, cfg: Discover) -> list[dict[str, np.ndarray]]:
    """Per image the discovered boxes (x, y, w, h px, best cut first) with their
    scores, patch features computed on the fly."""
    out = []
    h, w = images.shape[1:3]
    for start in range(0, len(images), 128):
        patches, grid = backbone.patches(images[start : start + 128])
        for k in patches:
            cuts = discover_objects(k, grid, cfg)
            out.append({"boxes": np.array([cut_to_object(c, h, w)[1] for c in cuts]).reshape(-1, 4),
                        "scores": np.array([1.0 - c.eigenvalue for c in cuts])})
    return out


def top_box(found: dict[str, np.ndarray]) -> list[float]:
    return found["boxes"][0].tolist() if len(found["boxes"]) else [0.0, 0.0, 0.0, 0.0]


def draw_grid(images: np.ndarray, gt: list, found: list, pred: list, scale: int = 4, cols: int = 8) -> bytes:
    """PNG of images with ground truth (green), discovered (yellow) and detected (red) boxes."""
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


@flow(name="evaluate")
def evaluate_flow(params: Params, test: str, images: str, features: str, encoder_arg: str, generator: str,
                  detector: str, metrics: str, plots: str) -> dict[str, float]:
    log = get_run_logger()
    cfg, dcfg = params.evaluate, params.discover
    scenes = read_table(test, columns=["image", "objects"]).to_pylist()
    gt_masks = [[o["mask"] for o in r["objects"]] for r in scenes]
    test_images = np.stack([decode_png(r["image"]) for r in scenes])
    gt = [[o["box"] for o in r["objects"]] for r in scenes]
    classes = list(dcfg.classes)
    gt_labels = [[classes.index(o["class_name"]) + 1 if o["class_name"] in classes else 0 for o in r["objects"]] for r in scenes]

    encoder = load_encoder(encoder_spec(encoder_arg))
    spec = params.features.patch_backbone
    backbone = load_patch_backbone(spec, encoder, generator)
    if spec == "encoder" or spec.startswith("encoder:"):
        random_encoder = load_encoder(f"random:{params.train_encoder.config}:{cfg.random_seed}", encoder.device)
        baseline = EncoderPatches(random_encoder, spec.partition(":")[2] or "keys")
    else:
        baseline = load_patch_backbone(spec, encoder, generator, random_seed=cfg.random_seed)
    learned = discovery_boxes(backbone, test_images, dcfg)
    random = discovery_boxes(baseline, test_images, dcfg)
    discovery_coco, _ = coco_detection(gt, learned, test_images.shape[1:3])

    rounds, curves = [], []
    for path in sorted(Path(detector).glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        model = load_detector(path)
        dets = predict(model, test_images)
        dets = [{k: v[d["scores"] >= cfg.score_thresh] for k, v in d.items()} for d in dets]
        coco, pr = coco_detection(gt, dets, test_images.shape[1:3])
        rounds.append({k.lower(): v for k, v in coco.items()})
        n_classes = model.roi_heads.box_predictor.cls_score.out_features - 1
        if n_classes > 1:  # a class-aware head: also score its labels against the scenes' classes
            aware, _ = coco_detection(gt, dets, test_images.shape[1:3], gt_labels, n_classes)
            rounds[-1]["class_aware"] = {k.lower(): v for k, v in aware.items()}
        if "masks" in (dets[0] if dets else {}):  # Mask R-CNN: class-agnostic mask AP too
            masked, _ = coco_segmentation(gt_masks, dets, test_images.shape[1:3])
            rounds[-1]["mask"] = {k.lower(): v for k, v in masked.items()}
        curves.append(pr)
    if not rounds:
        raise FileNotFoundError(f"{detector} holds no round-K detector (run stage train_detector)")

    gen = read_table(images, columns=["id", "class_name"]).to_pylist()
    emb = {r["id"]: r["embedding"] for r in read_table(features, columns=["id", "embedding"]).to_pylist()}
    with torch.inference_mode():
        text = encoder.encode_text([dcfg.prompt_template.format(c) for c in classes]).float().numpy()
    known = [r for r in gen if r["class_name"] in classes]
    alignment = prompt_alignment(np.array([emb[r["id"]] for r in known], dtype=np.float32).reshape(len(known), -1),
                                 text, [classes.index(r["class_name"]) for r in known])

    result = {
        "discovery": {
            "method": dcfg.method,
            "backbone": spec,
            "corloc": corloc([top_box(f) for f in learned], gt, cfg.iou),
            "corloc_random_weights": corloc([top_box(f) for f in random], gt, cfg.iou),
            "ap50": discovery_coco["AP50"],
        },
        "detector": {**rounds[-1], "rounds": rounds},
        "generation": {"prompt_alignment": alignment, "images": len(gen)},
        "test_images": len(scenes),
    }
    atomic_write_json(Path(metrics), result)
    plot_dir = Path(plots)
    for r, curve in enumerate(curves):  # one file per self-training round: `dvc plots` draws each
        rows = "".join(f"{x:.2f},{p:.4f}\n" for x, p in zip(np.linspace(0, 1, 101), curve))
        atomic_write_bytes(plot_dir / "pr" / f"round-{r}.csv", ("recall,precision\n" + rows).encode())
    n = min(cfg.grid_images, len(scenes))
    top = [[d["boxes"][0].tolist()] if len(d["boxes"]) else [] for d in dets[:n]]
    discovered = [[top_box(f)] for f in learned[:n]]
    atomic_write_bytes(plot_dir / "detections.png", draw_grid(test_images[:n], gt[:n], discovered, top))

    table = [
        {"metric": f"discovery CorLoc ({spec})", "value": round(result["discovery"]["corloc"], 4)},
        {"metric": "discovery CorLoc (same backbone, random weights)", "value": round(result["discovery"]["corloc_random_weights"], 4)},
        *({"metric": f"detector AP50 round {r} (class-agnostic)", "value": round(m["ap50"], 4)} for r, m in enumerate(rounds)),
        {"metric": "detector AP (class-agnostic, last round)", "value": round(rounds[-1]["ap"], 4)},
        {"metric": "prompt alignment", "value": round(alignment, 4)},
    ]
    create_table_artifact(table, key="mirage-metrics", description="mirage evaluate")
    create_markdown_artifact("\n".join(f"- **{r['metric']}**: {r['value']}" for r in table), key="mirage-summary")
    log.info("metrics: %s", result)
    return result


def main(argv: list[str] | None = None) -> None:
    params, args = parse("evaluate", ["test", "images", "features", "encoder", "generator", "detector", "metrics", "plots"], argv)
    evaluate_flow(params, args.test, args.images, args.features, args.encoder, args.generator, args.detector,
                  args.metrics, args.plots)


if __name__ == "__main__":
    main(sys.argv[1:])
