"""The `mirage` command: what DVC and Prefect do not already give."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from mirage.data.params import ParamsError, parse_override


def cmd_run(args: argparse.Namespace) -> int:
    from flows import pipeline
    from mirage.run import scheduler

    start = time.perf_counter()
    overrides = dict(parse_override(s) for s in args.set)
    with ctrl_c_stops(Path(args.root)) as stopped:
        results = pipeline.run(args.root, overrides, force=args.force)
    if stopped:
        return 130
    print(scheduler.summary(args.root, results, time.perf_counter() - start))
    return 0


@contextlib.contextmanager
def ctrl_c_stops(root: Path):
    """Ctrl-C: the run stops at the next item, cut or training step of every
    stage (finished batches kept), its flow runs read Cancelled, exit 130;
    a second Ctrl-C exits at once (os._exit: outputs are atomic, so nothing
    is half-written; the next run resumes)."""
    import signal

    stopped: list[bool] = []

    def on_sigint(signum, frame):
        if stopped:
            os.write(2, b"\nmirage: second Ctrl-C: exiting now (finished batches are kept; the next run resumes)\n")
            os._exit(130)
        stopped.append(True)
        os.write(2, b"\nmirage: stopping at the next item or step (Ctrl-C again to exit at once)\n")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield stopped
    except KeyboardInterrupt:
        stopped[:] = [True]
        from mirage.run.liveness import mark_cancelled

        with contextlib.suppress(Exception):  # a server that does not answer: the run is stopped all the same
            names = mark_cancelled(root)
            if names:
                print(f"mirage: stopped by Ctrl-C; marked Cancelled: {', '.join(names)}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, previous)


def cmd_train(args: argparse.Namespace) -> int:
    from flows import pipeline
    from mirage.run import scheduler

    start = time.perf_counter()
    unknown = set(args.models) - {"generator", "encoder"}
    if unknown:
        print(f"mirage train: unknown model {sorted(unknown)}: expected generator and/or encoder", file=sys.stderr)
        return 2
    stages = tuple(f"train_{m}" for m in (args.models or ["generator", "encoder"]))
    results = pipeline.run(args.root, force=False, train=stages)
    print(scheduler.summary(args.root, results, time.perf_counter() - start))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from mirage.run.server import run_server

    return run_server(args.root, args.host, args.port, args.home)


def cmd_serve(args: argparse.Namespace) -> int:
    from mirage.data import params as params_mod
    from mirage.run.server import connect

    root = Path(args.root).resolve()
    overrides = dict(parse_override(s) for s in args.set)
    params_mod.load(root / "params.yaml", overrides)  # bad overrides fail now, not at 2 a.m.
    if (args.cron is None) == (args.interval is None):
        print("mirage serve: give one of --cron or --interval", file=sys.stderr)
        return 2
    if not connect(root, temporary=False):  # Prefect's temporary server has no scheduler
        print("mirage serve: no Prefect server to schedule runs on: start `mirage server` in this project "
              "first (or point PREFECT_API_URL at a running Prefect server)", file=sys.stderr)
        return 2
    from flows.pipeline import mirage_pipeline

    mirage_pipeline.serve(
        name=args.name, cron=args.cron, interval=args.interval, limit=1, global_limit=1,
        parameters={"root": str(root), "overrides": overrides},
        description=f"mirage pipeline of {root}: DVC decides what is stale; "
                    + (f"overrides {overrides}" if overrides else "params.yaml as it is"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mirage.data import params as params_mod
    from mirage.run import scheduler

    root = Path(args.root).resolve()
    params_mod.load(root / "params.yaml")  # bad params are named first
    status = scheduler.explain(root)
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


def cmd_push(args: argparse.Namespace) -> int:
    from mirage.run import remote

    sent = remote.push(Path(args.root).resolve(), args.remote, args.jobs)
    print(f"pushed {sent} file(s) to the DVC remote")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from mirage.run import remote

    fetched, still = remote.pull(Path(args.root).resolve(), args.remote, args.jobs)
    print(f"pulled {fetched} file(s) from the DVC remote")
    print("nothing stale: `mirage run` would run no stage" if not still else
          f"still stale (`mirage status` says why): {', '.join(still)}")
    return 0


def cmd_eval_coco(args: argparse.Namespace) -> int:
    import json

    from flows.eval_coco import eval_coco
    from mirage.data.store import atomic_write_json

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
    from mirage.data import params as params_mod
    from mirage.models.encoders import load_encoder
    from mirage.models.fingerprint import encoder_spec, under
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
    server = sub.add_parser("server", help="run Prefect's server and dashboard for this project (foreground)")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    server.add_argument("--port", type=int, default=4200)
    server.add_argument("--home", default=None,
                        help="the server's PREFECT_HOME (its SQLite database), e.g. .mirage/prefect for a dashboard "
                             "of this project's runs only (default: PREFECT_HOME, shared by every project)")
    server.set_defaults(func=cmd_server)
    serve = sub.add_parser("serve", help="run the pipeline on a schedule (a Prefect deployment served here)")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", help='e.g. "0 2 * * *" (UTC): every night at 2')
    when.add_argument("--interval", type=float, help="seconds between runs")
    serve.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                       help="parameters each scheduled run sets in params.yaml first")
    serve.add_argument("--name", default="scheduled", help="the deployment's name (default: scheduled)")
    serve.set_defaults(func=cmd_serve)
    status = sub.add_parser("status", help="show the stale stages and why")
    status.set_defaults(func=cmd_status)
    for name, func, text in (("push", cmd_push, "upload data and models dvc.lock records to the DVC remote"),
                             ("pull", cmd_pull, "download them (a fresh clone then has nothing stale)")):
        share = sub.add_parser(name, help=text)
        share.add_argument("-r", "--remote", help="a remote by name (default: the project's default remote)")
        share.add_argument("-j", "--jobs", type=int, help="parallel transfers (DVC's default if unset)")
        share.set_defaults(func=func)
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
    from mirage.run.scheduler import PipelineError, StageFailed

    try:
        return args.func(args)
    except (ParamsError, PipelineError) as err:
        print(f"mirage: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"mirage: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if type(err).__name__ != "LockError":  # DVC's: a pipeline run or `dvc repro` holds the workspace
            raise
        from mirage.run.scheduler import busy

        print(f"mirage: {busy(Path(args.root).resolve())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
