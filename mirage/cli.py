"""The `mirage` command: what DVC and Prefect do not already give."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mirage.params import ParamsError, parse_override


def cmd_run(args: argparse.Namespace) -> int:
    from mirage import pipeline

    start = time.perf_counter()
    overrides = dict(parse_override(s) for s in args.set)
    results = pipeline.run(args.root, overrides, force=args.force)
    print(pipeline.summary(args.root, results, time.perf_counter() - start))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mirage import pipeline

    why = pipeline.stale(Path(args.root).resolve())
    if not why:
        print("nothing stale: `mirage run` would run no stage")
    for stage, reasons in why.items():
        print(f"{stage}: stale")
        for reason in reasons:
            print(f"  {reason}")
    return 0


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import json

    from mirage.store import atomic_write_json
    from tasks.coco_dataset import evaluate_detector, load_coco

    try:
        items = load_coco(args.annotations, args.images)
        result: dict = {"dataset": str(args.annotations), "images": len(items)}
        if args.discovery:
            result["discovery"] = _coco_discovery(Path(args.root), items)
        if args.detector != "none":
            model, path = _detector(Path(args.detector))
            result["detector"] = str(path)
            result |= {k.lower(): v for k, v in evaluate_detector(model, items, args.score_thresh).items()}
    except (ValueError, FileNotFoundError) as err:
        print(f"mirage eval-coco: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


def _detector(detector: Path):
    from tasks.train_detector import load_detector

    rounds = sorted(detector.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    path = rounds[-1] if rounds and not (detector / "model.safetensors").exists() else detector
    return load_detector(path), path


def _under(root: Path, model: str) -> str:
    """A model named in params.yaml: a path relative to the project root if it
    exists there, else the name itself (a hub id, `random:...`)."""
    return str(root / model) if (root / model).exists() else model


def _coco_discovery(root: Path, items) -> dict:
    """Discovery CorLoc/AP on the dataset with the project's patch backbone and discover params."""
    from mirage import params as params_mod
    from mirage.fingerprint import encoder_spec
    from mirage.models import load_encoder, load_patch_backbone
    from tasks.coco_dataset import evaluate_discovery

    p = params_mod.load(root / "params.yaml")
    encoder = load_encoder(encoder_spec(_under(root, p.features.encoder)))
    generator = _under(root, p.generate.model)
    backbone = load_patch_backbone(p.features.patch_backbone, encoder, generator)
    size = backbone.unet.config.sample_size if p.features.patch_backbone.startswith("unet") else encoder.image_size
    stats = evaluate_discovery(backbone, int(size), items, p.discover, p.evaluate.iou)
    return {"backbone": p.features.patch_backbone, "method": p.discover.method, "input_size": int(size), **stats}


def cmd_search(args: argparse.Namespace) -> int:
    from mirage import params as params_mod
    from mirage.fingerprint import encoder_spec
    from mirage.models import load_encoder
    from mirage.search import contact_sheet, search

    root = Path(args.root)
    cfg = params_mod.load(root / "params.yaml").features
    if args.k < 1:
        print("mirage search: -k must be >= 1", file=sys.stderr)
        return 2
    try:
        encoder = load_encoder(encoder_spec(_under(root, cfg.encoder)))
        hits = search(args.query, root / args.features, root / args.images, encoder, args.k)
    except (ValueError, FileNotFoundError) as err:
        print(f"mirage search: {err}", file=sys.stderr)
        return 2
    print(f"{'rank':>4}  {'score':>6}  {'id':<20}  {'prompt':<24}  path")
    for n, hit in enumerate(hits, 1):
        print(f"{n:>4}  {hit.score:6.3f}  {hit.id:<20}  {hit.prompt:<24}  {hit.path}")
    if args.sheet:
        contact_sheet(hits, args.sheet)
        print(f"contact sheet: {args.sheet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mirage", description="synthetic images in, object detectors out")
    parser.add_argument("--root", default=".", help="project root (holds dvc.yaml and params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the stale stages as one Prefect flow run")
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter in params.yaml (like `dvc exp run -S`)")
    run.add_argument("--force", action="store_true", help="run every stage even if up to date")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="show the stale stages and why")
    status.set_defaults(func=cmd_status)
    coco = sub.add_parser("eval-coco", help="class-agnostic COCO AP of a detector (and --discovery CorLoc) on any COCO-format dataset")
    coco.add_argument("--annotations", required=True, help="COCO detection JSON (instances_*.json)")
    coco.add_argument("--images", required=True, help="folder the file_name entries are relative to")
    coco.add_argument("--detector", default="models/detector",
                      help="a saved detector, or a train_detector output (last round); 'none' to skip")
    coco.add_argument("--discovery", action="store_true",
                      help="also discover objects (features.patch_backbone, discover.*) and report CorLoc and AP")
    coco.add_argument("--score-thresh", type=float, default=0.05)
    coco.add_argument("--out", help="also write the metrics JSON here")
    coco.set_defaults(func=cmd_eval_coco)
    find = sub.add_parser("search", help="rank cached images by similarity to a text query")
    find.add_argument("query", help='e.g. "a red circle"')
    find.add_argument("-k", type=int, default=10, help="how many images to show")
    find.add_argument("--sheet", help="also write a contact sheet PNG of the hits here")
    find.add_argument("--features", default="data/features", help="the features table (relative to --root)")
    find.add_argument("--images", default="data/generated", help="the images table (relative to --root)")
    find.set_defaults(func=cmd_search)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as err:
        print(f"mirage: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
