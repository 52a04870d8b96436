"""What makes the detector's boxes loose?  One thing varied at a time.

Trains the detector exactly as stage train_detector does (round 0 on the
discovered pseudo-boxes, then the self-training rounds), once per variant, on
a finished project's tables (data/generated, data/discovery and, when there,
data/imported), and prints for the test and ood splits the last round's COCO
AP, AP50, AP75 and AR100 (class-agnostic, every round's AP too), and how its
boxes sit on the ground truth: for each ground-truth box matched by a
detection at IoU >= 0.5, the mean width and height difference (px, detection
minus truth) and the mean IoU.  The teacher's line (the evaluate stage's
MaskCut and TokenCut on the same splits, from metrics/evaluate.json) is
printed first, and the pseudo-boxes' own bias where it can be measured.

    .venv/bin/python benchmarks/detector_boxes.py                  # every variant (~3 min each on 2 cores)
    .venv/bin/python benchmarks/detector_boxes.py --variants defaults,min_size=128
    .venv/bin/python benchmarks/detector_boxes.py --project /path/to/finished/project
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirage.data.images import box_iou  # noqa: E402
from mirage.data.params import load  # noqa: E402
from tasks.evaluate import detector_metrics, load_test_split  # noqa: E402
from tasks.train_detector import merge_predictions, mix_weights, paste_pool, predict, pseudo_labelled, train  # noqa: E402

# name -> train_detector overrides: each changes one thing from the project's params;
# "filter" drops pseudo-objects before training (what the teacher gets wrong on generated images)
VARIANTS: dict[str, dict] = {
    "drop spanning pseudo-boxes": {"drop_spanning": True},   # the stage's own filter (pseudo_labelled)
    "keep spanning pseudo-boxes": {"drop_spanning": False},
    "pseudo score>=0.9": {"filter": "score", "drop_spanning": False},
    "defaults": {},
    "min_size=128": {"min_size": 128},
    "steps x3": {"steps": "x3", "self_train_steps": "x3"},
    "no self-training": {"self_train_scores": []},
    "self_train_scores=[0.9]": {"self_train_scores": [0.9]},
    "drop_loss_iou=null": {"drop_loss_iou": None},
    "lr=0.02": {"lr": 0.02},
    "scale_jitter=[0.75,1.25]": {"scale_jitter": [0.75, 1.25]},
    "copy_paste=0.5": {"copy_paste": 0.5},
    "mix generated 0.25": {"mix": {"generated": 0.25, "imported": 1.0}},
    "two self-training rounds": {"self_train_scores": [0.7, 0.7]},
    "steps x2": {"steps": "x2", "self_train_steps": "x2"},
    # combinations of the single changes that helped
    "mix 0.25 + two rounds": {"mix": {"generated": 0.25, "imported": 1.0}, "self_train_scores": [0.7, 0.7]},
    "mix 0.25 + three rounds": {"mix": {"generated": 0.25, "imported": 1.0}, "self_train_scores": [0.7, 0.7, 0.7]},
}


def box_bias(dets: list[dict], gt_boxes: list[list[list[float]]], score: float = 0.05) -> dict[str, float]:
    """Mean (detection - truth) width and height in px, and mean IoU, over the
    ground-truth boxes whose best detection overlaps them by IoU >= 0.5."""
    dw, dh, ious = [], [], []
    for det, gts in zip(dets, gt_boxes):
        boxes = det["boxes"][det["scores"] >= score]
        if not len(boxes) or not len(gts):
            continue
        iou = box_iou(np.asarray(gts), boxes)
        for g, row in zip(gts, iou):
            best = int(row.argmax())
            if row[best] >= 0.5:
                dw.append(boxes[best][2] - g[2])
                dh.append(boxes[best][3] - g[3])
                ious.append(row[best])
    if not ious:
        return {"dw": float("nan"), "dh": float("nan"), "iou": float("nan"), "matched": 0}
    return {"dw": float(np.mean(dw)), "dh": float(np.mean(dh)), "iou": float(np.mean(ious)), "matched": len(ious)}


def pseudo_scores(root: Path, classes) -> list[list[float]]:
    """Each pseudo-labelled image's objects' cut scores, in pseudo_labelled's order."""
    from mirage.data.store import read_table

    found = {}
    for r in read_table(root / "data/discovery", columns=["image_id", "objects"]).to_pylist():
        kept = [o["score"] for o in r["objects"] if o["box"][2] > 0 and o["box"][3] > 0]
        if kept:
            found[r["image_id"]] = kept
    tables = [root / "data/generated"] + ([root / "data/imported"] if (root / "data/imported/manifest.json").exists() else [])
    return [found[i] for t in tables for i in read_table(t, columns=["id"]).column("id").to_pylist() if i in found]


def filtered(data, labelled, sources, scores, min_score: float = 0.9):
    """Pseudo-labels without the objects whose cut scores below `min_score`; images left without one are dropped."""
    keep_img, out = [], []
    for i, (item, sc) in enumerate(zip(labelled, scores)):
        keep = [k for k in range(len(item["boxes"])) if sc[k] >= min_score]
        if keep:
            keep_img.append(i)
            out.append({key: [item[key][k] for k in keep] for key in ("boxes", "labels", "masks")})
    return data[keep_img], out, [sources[i] for i in keep_img]


def train_rounds(cfg, classes, data, labelled, sources) -> list:
    """The stage's rounds (flows/train_detector.py), without checkpoints or files."""
    keep, probs = mix_weights(sources, cfg.mix)
    data, labelled = data[keep], [labelled[i] for i in keep]
    pool = paste_pool(labelled, data.shape[1:3]) if cfg.copy_paste else None
    rounds = [(cfg.steps, None), *[(cfg.self_train_steps, s) for s in cfg.self_train_scores]]
    model, models = None, []
    num_classes = len(classes) if cfg.class_aware else 1
    for r, (steps, score) in enumerate(rounds):
        if score is not None:
            labelled = merge_predictions(labelled, predict(model, data), score)
        model, _ = train(cfg, data, labelled, None, steps=steps, start=model, num_classes=num_classes,
                         paste_pool=pool, round_=r, probs=probs)
        models.append(model)
    return models


def round_metrics(models, split: dict, thresh: float) -> dict:
    out = {"rounds": []}
    for model in models:
        dets = [{k: v[d["scores"] >= thresh] for k, v in d.items()} for d in predict(model, split["images"])]
        metrics, _ = detector_metrics(model, dets, split["boxes"], split["images"].shape[1:3])
        out["rounds"].append(metrics)
    out["bias"] = box_bias(dets, split["boxes"])
    return out


def line(name: str, m: dict, bias: dict | None = None) -> str:
    text = f"  {name:<28} AP {m['ap']:.3f}  AP50 {m['ap50']:.3f}  AP75 {m.get('ap75', float('nan')):.3f}"
    text += f"  AR100 {m.get('ar100', float('nan')):.3f}"
    if bias:
        text += f"  | dw {bias['dw']:+.2f} dh {bias['dh']:+.2f} px, IoU {bias['iou']:.3f} ({bias['matched']} matched)"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default=str(ROOT), help="a project after `mirage run` (default: this checkout)")
    ap.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); two studies side by side: 1 each")
    args = ap.parse_args()
    root = Path(args.project)
    params = load(root / "params.yaml")
    classes = list(params.discover.classes)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = {"test": load_test_split(str(root / "data/toyworld/test"), classes)}
    if (root / "data/toyworld/ood").exists():
        splits["ood"] = load_test_split(str(root / "data/toyworld/ood"), classes)
    imported = root / "data/imported"
    loaded: dict[bool, tuple] = {}

    def pseudo_labels(drop_spanning: bool) -> tuple:
        """What the stage trains on (its own pseudo_labelled), once per drop_spanning value."""
        if drop_spanning not in loaded:
            loaded[drop_spanning] = pseudo_labelled(
                str(root / "data/generated"), str(root / "data/discovery"),
                classes if params.train_detector.class_aware else None,
                str(imported) if (imported / "manifest.json").exists() else None, drop_spanning)
        return loaded[drop_spanning]

    data, labelled, sources = pseudo_labels(False)
    print(f"{len(data)} images with pseudo-boxes ({', '.join(f'{s}: {sources.count(s)}' for s in sorted(set(sources)))}); "
          f"params {root / 'params.yaml'}")
    scores = pseudo_scores(root, classes)  # in the order of the unfiltered pseudo-labels
    assert len(scores) == len(labelled)
    metrics = json.loads((root / "metrics/evaluate.json").read_text()) if (root / "metrics/evaluate.json").exists() else {}
    for name, split in splits.items():
        print(f"{name} ({len(split['images'])} scenes), teachers (evaluate stage):")
        for method, m in metrics.get("splits", {}).get(name, {}).get("discovery", {}).items():
            print(line(method, m))
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    for name in chosen:
        if name not in VARIANTS:
            sys.exit(f"--variants: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        base = params.train_detector
        update = {k: (getattr(base, k) * int(v[1:]) if v in ("x2", "x3") else v) for k, v in VARIANTS[name].items()
                  if k != "filter"}
        cfg = base.model_copy(update=update)
        start = time.perf_counter()
        inputs = pseudo_labels(cfg.drop_spanning)
        if "filter" in VARIANTS[name]:
            inputs = filtered(data, labelled, sources, scores)
            update |= {"filter": VARIANTS[name]["filter"], "images": len(inputs[0]),
                       "objects": sum(len(x["boxes"]) for x in inputs[1])}
        models = train_rounds(cfg, classes, *inputs)
        seconds = time.perf_counter() - start
        print(f"variant {name} ({update or 'the project params'}; trained in {seconds:.0f} s):", flush=True)
        for split_name, split in splits.items():
            s = round_metrics(models, split, params.evaluate.score_thresh)
            per_round = " -> ".join(f"{r['ap']:.3f}" for r in s["rounds"])
            print(line(f"{split_name} (AP by round {per_round})", s["rounds"][-1], s["bias"]), flush=True)


if __name__ == "__main__":
    main()
