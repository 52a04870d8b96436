"""The `mirage` command: what DVC and Prefect do not already give."""
from __future__ import annotations

import argparse
import os
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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as err:
        print(f"mirage: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
