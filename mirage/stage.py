"""What every stage's flow module shares: its command line and progress bars.

A stage's command (in dvc.yaml) is `python -m flows.<stage> --params
params.yaml --<path> ...`; `mirage run` calls the same `main(argv)` in-process
with the argv parsed from dvc.yaml, so paths live in dvc.yaml only.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mirage import params as params_mod


def parser(stage: str, paths: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m flows.{stage}", description=f"mirage stage {stage}")
    p.add_argument("--params", default="params.yaml", help="the project's params.yaml")
    for name in paths:
        p.add_argument(f"--{name}", required=True)
    return p


def parse(stage: str, paths: Sequence[str], argv: Sequence[str] | None) -> tuple[params_mod.Params, argparse.Namespace]:
    args = parser(stage, paths).parse_args(argv)
    return params_mod.load(args.params), args


class _Bar(tqdm):
    def set_postfix(self, *args, **kwargs):
        # redraw only at tqdm's own pace (mininterval): a refresh on every call
        # floods logs when stderr is a file
        kwargs["refresh"] = False
        super().set_postfix(*args, **kwargs)


def progress(total: int, desc: str, unit: str = "item") -> tqdm:
    """A progress bar on stderr (with items/s) that stays quiet when nothing is to be done."""
    return _Bar(total=total, desc=desc, unit=unit, disable=total == 0, leave=False, mininterval=1.0)


POOL_ENV = "MIRAGE_POOL"


def pool_dir(stage: str) -> Path:
    """Where a stage keeps rows it no longer outputs (for switching back):
    `.mirage/pool/<stage>` under the working directory (the project root), or
    under $MIRAGE_POOL.  Outside every DVC output, so outputs stay identical to
    a from-scratch run; delete it any time to reclaim disk."""
    return Path(os.environ.get(POOL_ENV, ".mirage/pool")) / stage
