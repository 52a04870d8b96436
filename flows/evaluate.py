"""Stage evaluate: discovery CorLoc (learned vs random encoder), detector AP, prompt alignment."""
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
from mirage.models import Encoder, load_encoder
from mirage.params import Discover, Evaluate, Params
from mirage.stage import parse
from mirage.store import atomic_write_bytes, atomic_write_json, read_table
from tasks.discover import cut_to_object, tokencut
from tasks.evaluate import coco_detection, corloc, prompt_alignment
from tasks.train_detector import load_detector, predict


def discovery_boxes(encoder: Encoder, images: np.ndarray, cfg: Discover) -> list[list[float]]:
    """TokenCut box per image, features computed on the fly."""
    boxes = []
    h, w = images.shape[1:3]
    for start in range(0, len(images), 128):
        with torch.inference_mode():
            _, keys = encoder.encode_images(images[start : start + 128])
        for k in keys.float().numpy():
            boxes.append(cut_to_object(tokencut(k, encoder.patch_grid, cfg.tau, cfg.eps), h, w)[1])
    return boxes


def draw_grid(images: np.ndarray, gt: list, pred: list, scale: int = 4, cols: int = 8) -> bytes:
    """PNG of images with ground truth (green) and top detections (red)."""
    tiles = []
    for img, g, p in zip(images, gt, pred):
        tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for color, boxes in (("lime", g), ("red", p)):
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
def evaluate_flow(params: Params, test: str, images: str, features: str, encoder_arg: str, detector: str,
                  metrics: str, plots: str) -> dict[str, float]:
    log = get_run_logger()
    cfg, dcfg = params.evaluate, params.discover
    scenes = read_table(test, columns=["image", "objects"]).to_pylist()
    test_images = np.stack([decode_png(r["image"]) for r in scenes])
    gt = [[o["box"] for o in r["objects"]] for r in scenes]

    encoder = load_encoder(encoder_spec(encoder_arg))
    baseline = load_encoder(f"random:{params.train_encoder.config}:{cfg.random_seed}", encoder.device)
    learned_boxes = discovery_boxes(encoder, test_images, dcfg)
    random_boxes = discovery_boxes(baseline, test_images, dcfg)

    model = load_detector(detector)
    dets = predict(model, test_images)
    dets = [{"boxes": d["boxes"][d["scores"] >= cfg.score_thresh], "scores": d["scores"][d["scores"] >= cfg.score_thresh]} for d in dets]
    coco, pr = coco_detection(gt, dets, test_images.shape[1:3])

    gen = read_table(images, columns=["id", "class_name"]).to_pylist()
    emb = {r["id"]: r["embedding"] for r in read_table(features, columns=["id", "embedding"]).to_pylist()}
    classes = list(dcfg.classes)
    with torch.inference_mode():
        text = encoder.encode_text([dcfg.prompt_template.format(c) for c in classes]).float().numpy()
    known = [r for r in gen if r["class_name"] in classes]
    alignment = prompt_alignment(np.array([emb[r["id"]] for r in known], dtype=np.float32).reshape(len(known), -1),
                                 text, [classes.index(r["class_name"]) for r in known])

    result = {
        "discovery": {"corloc": corloc(learned_boxes, gt, cfg.iou), "corloc_random_encoder": corloc(random_boxes, gt, cfg.iou)},
        "detector": {k.lower(): v for k, v in coco.items()},
        "generation": {"prompt_alignment": alignment, "images": len(gen)},
        "test_images": len(scenes),
    }
    atomic_write_json(Path(metrics), result)
    plot_dir = Path(plots)
    rows = "".join(f"{r:.2f},{p:.4f}\n" for r, p in zip(np.linspace(0, 1, 101), pr))
    atomic_write_bytes(plot_dir / "pr_curve.csv", ("recall,precision\n" + rows).encode())
    n = min(cfg.grid_images, len(scenes))
    top = [[d["boxes"][0].tolist()] if len(d["boxes"]) else [] for d in dets[:n]]
    atomic_write_bytes(plot_dir / "detections.png", draw_grid(test_images[:n], gt[:n], top))

    table = [
        {"metric": "discovery CorLoc (learned encoder)", "value": round(result["discovery"]["corloc"], 4)},
        {"metric": "discovery CorLoc (random encoder)", "value": round(result["discovery"]["corloc_random_encoder"], 4)},
        {"metric": "detector AP50 (class-agnostic)", "value": round(coco["AP50"], 4)},
        {"metric": "detector AP (class-agnostic)", "value": round(coco["AP"], 4)},
        {"metric": "prompt alignment", "value": round(alignment, 4)},
    ]
    create_table_artifact(table, key="mirage-metrics", description="mirage evaluate")
    create_markdown_artifact("\n".join(f"- **{r['metric']}**: {r['value']}" for r in table), key="mirage-summary")
    log.info("metrics: %s", result)
    return result


def main(argv: list[str] | None = None) -> None:
    params, args = parse("evaluate", ["test", "images", "features", "encoder", "detector", "metrics", "plots"], argv)
    evaluate_flow(params, args.test, args.images, args.features, args.encoder, args.detector, args.metrics, args.plots)


if __name__ == "__main__":
    main(sys.argv[1:])
