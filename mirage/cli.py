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


def cmd_train(args: argparse.Namespace) -> int:
    from mirage import pipeline

    start = time.perf_counter()
    unknown = set(args.models) - {"generator", "encoder"}
    if unknown:
        print(f"mirage train: unknown model {sorted(unknown)}: expected generator and/or encoder", file=sys.stderr)
        return 2
    stages = tuple(f"train_{m}" for m in (args.models or ["generator", "encoder"]))
    results = pipeline.run(args.root, force=False, train=stages)
    print(pipeline.summary(args.root, results, time.perf_counter() - start))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mirage import params as params_mod
    from mirage import pipeline

    root = Path(args.root).resolve()
    params_mod.load(root / "params.yaml")  # bad params are named first
    status = pipeline.explain(root)
    if not status.stale:
        print("nothing stale: `mirage run` would run no stage")
    for stage, reasons in status.stale.items():
        print(f"{stage}: stale")
        for reason in reasons:
            print(f"  {reason}")
    if status.downstream:
        print(f"then, as their inputs change: {', '.join(status.downstream)}")
    for stage, reasons in status.frozen.items():
        print(f"{stage}: frozen (committed model, not rerun; `mirage train {stage.removeprefix('train_')}` "
              f"retrains it); changed since it was trained:")
        for reason in reasons:
            print(f"  {reason}")
    return 0


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import json

    from flows.eval_coco import eval_coco
    from mirage.store import atomic_write_json

    try:
        result = eval_coco(Path(args.root), args.annotations, args.images, args.detector, args.discovery,
                           args.score_thresh)
    except (ValueError, FileNotFoundError) as err:
        print(f"mirage eval-coco: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from mirage import params as params_mod
    from mirage.fingerprint import encoder_spec, under
    from mirage.models import load_encoder
    from mirage.search import contact_sheet, search

    root = Path(args.root)
    cfg = params_mod.load(root / "params.yaml").features
    if args.k < 1:
        print("mirage search: -k must be >= 1", file=sys.stderr)
        return 2
    try:
        encoder = load_encoder(encoder_spec(under(root, cfg.encoder)))
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
    train = sub.add_parser("train", help="retrain the committed toy models (frozen stages), then run what is stale")
    train.add_argument("models", nargs="*", metavar="{generator,encoder}", help="default: both")
    train.set_defaults(func=cmd_train)
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
    from mirage.pipeline import PipelineError

    try:
        return args.func(args)
    except (ParamsError, PipelineError) as err:
        print(f"mirage: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
