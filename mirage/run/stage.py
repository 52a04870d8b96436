"""What every stage's flow module shares: its command line and progress bars.

A stage's command (in dvc.yaml) is `python -m flows.<stage> --params
params.yaml --<path> ...`; `mirage run` calls the same `main(argv)` in-process
with the argv parsed from dvc.yaml, so paths live in dvc.yaml only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from mirage.data import params as params_mod
from mirage.data.store import add_interruption_hook
from mirage.run import faults
from mirage.run.server import connect


def parser(stage: str, paths: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m flows.{stage}", description=f"mirage stage {stage}")
    p.add_argument("--params", default="params.yaml", help="the project's params.yaml")
    for name in paths:
        p.add_argument(f"--{name}", required=True)
    return p


def parse(stage: str, paths: Sequence[str], argv: Sequence[str] | None) -> tuple[params_mod.Params, argparse.Namespace]:
    args = parser(stage, paths).parse_args(argv)
    params = params_mod.load(args.params)
    root = Path(os.path.abspath(args.params)).parent
    for name in paths:  # a stage reads and writes inside its project (lexically: data/ may be a symlink)
        target = Path(os.path.abspath(getattr(args, name)))
        if not target.is_relative_to(root):
            raise params_mod.ParamsError(f"--{name} {getattr(args, name)!r} of stage {stage} is outside the "
                                         f"project {root}: stage paths stay inside it")
    from mirage.run.locks import _RUN_LOCKS, run_lock

    own_process = Path(root).resolve() not in _RUN_LOCKS
    if own_process:  # a process of its own (`dvc repro`, which unlocks DVC's
        _TAGS.enter_context(run_lock(root))  # repo while a stage command runs): no `mirage run` beside it
    api = connect(Path(args.params).resolve().parent)  # under `dvc repro`: report to the project's `mirage server` if up
    if own_process:
        from prefect import tags

        from mirage.run.liveness import mark_crashed, workspace_tags

        _TAGS.enter_context(tags(*workspace_tags(root)))
        if api:  # a server that outlives this process: runs of a killed one may still read Running there
            with contextlib.suppress(Exception):  # the stage runs whether or not the server answers this
                mark_crashed(root)
    faults.point("stage-start")  # tests: a stage holding its run's lock, before it computes anything
    experiment = os.environ.get("DVC_EXP_NAME")  # set by `dvc exp run` for its stage commands
    if experiment:
        from prefect import tags

        _TAGS.enter_context(tags(f"exp:{experiment}"))  # this process runs one stage, then ends
    return params, args


_TAGS = contextlib.ExitStack()

RESULT = "mirage-stage-result:"  # the line a stage command prints last


def command(main) -> None:
    """A stage's `python -m flows.<stage>` entry: run `main`, then print
    what it did (items, computed, reused, metrics) as one JSON line on
    stdout.  A bad parameter exits 2 with the key named; a failure exits
    non-zero with its traceback (what `dvc repro` shows)."""
    from mirage.run.locks import PipelineError

    try:
        result = main(sys.argv[1:])
    except (params_mod.ParamsError, PipelineError) as err:
        print(f"mirage: {err}", file=sys.stderr)
        sys.exit(2)
    print(RESULT, json.dumps(result, default=str, sort_keys=True), flush=True)


STOP = threading.Event()  # set when the pipeline run is stopped (cancelled, SIGTERM, Ctrl-C)


class StageStopped(RuntimeError):
    """The pipeline run was stopped while this stage ran (in a thread of it)."""


def _stop_here(point: str) -> None:
    """Between batches of the store and before every cut (points of
    mirage.data.store.interruption_point): a stopped run's stages end here."""
    if point in ("cut", "batch", "batch-saved") and STOP.is_set():
        raise StageStopped(f"the pipeline run was stopped (at {point})")


add_interruption_hook(_stop_here)


class _Bar(tqdm):
    """tqdm on stderr, mirrored (inside a flow run) to a Prefect progress
    artifact updated every few seconds, so the dashboard shows long stages move."""

    ARTIFACT_EVERY = 3.0  # seconds between dashboard updates

    def __init__(self, *args, **kwargs):
        self._artifact = None
        super().__init__(*args, **kwargs)
        self._artifact = None if self.disable else _progress_artifact(self.desc, self.total)
        self._reported = time.monotonic()

    def set_postfix(self, *args, **kwargs):
        # redraw only at tqdm's own pace (mininterval): a refresh on every call
        # floods logs when stderr is a file
        kwargs["refresh"] = False
        super().set_postfix(*args, **kwargs)

    def update(self, n=1):
        if STOP.is_set():  # a stage running beside the pipeline's thread ends at its next step or batch
            raise StageStopped("the pipeline run was stopped")
        shown = super().update(n)
        if self._artifact and time.monotonic() - self._reported >= self.ARTIFACT_EVERY:
            self._report()
        return shown

    def plan(self, kept: int, to_compute: int) -> None:
        """What a store found made already (the store's `on_plan`): the bar
        starts there, says so, and its rate counts this run's items only; a
        run resuming earlier work says it in the log too."""
        if not kept:
            return
        name = self.desc
        self.initial = kept
        self.n = self.last_print_n = kept
        self.set_description_str(f"{name} ({kept} kept, {to_compute} to compute)", refresh=False)
        if to_compute:
            logger().info("%s: %d of %d items kept from earlier runs, %d to compute", name, kept, self.total,
                          to_compute)

    def close(self):
        if self._artifact:
            self._report()
        super().close()

    def __del__(self):
        # a bar left open (a stage that raised) is closed by the garbage collector, which can run
        # inside the Prefect client's own request, holding its connection pool's lock: a report
        # from here waited for that lock forever (a hung test run). The dashboard misses its last tick
        self._artifact = None
        super().__del__()

    def _report(self) -> None:
        from prefect.artifacts import update_progress_artifact

        self._reported = time.monotonic()
        try:
            update_progress_artifact(self._artifact, 100.0 * self.n / max(self.total or 1, 1))
        except Exception:  # the dashboard is a view: never fail a stage over it
            self._artifact = None


def _progress_artifact(desc: str, total: int | None):
    """A progress artifact for this bar when running inside a Prefect flow run."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return None
    from prefect.artifacts import create_progress_artifact

    key = re.sub(r"[^a-z0-9]+", "-", desc.lower()).strip("-") + "-progress"
    try:
        return create_progress_artifact(0.0, key=key, description=f"{desc}: {total} steps")
    except Exception:
        return None


def progress(total: int, desc: str, unit: str = "item") -> tqdm:
    """A progress bar on stderr (with items/s) that stays quiet when nothing is to be done."""
    return _Bar(total=total, desc=desc, unit=unit, disable=total == 0, leave=False, mininterval=1.0)


class LossProgress:
    """The `on_step(step, loss)` callback of a training loop: a bar showing the
    running mean loss (over `window` steps), and a log line every `log_every`
    steps.  Use as a context manager; `losses` keeps every step's loss."""

    def __init__(self, steps: int, desc: str, window: int = 20, log_every: int = 0, log=None):
        self.bar = progress(steps, desc)
        self.window, self.log_every, self.log = window, log_every, log
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        faults.point("train-step")
        self.losses.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.mean():.4f}")
        if self.log and self.log_every and step % self.log_every == 0:
            self.log.info("step %d loss %.4f", step, self.mean())

    def resume(self, losses: list[float]) -> None:
        """Continue after `losses` (a checkpoint's): the bar and the mean go on from there."""
        self.losses = list(losses)
        self.bar.n = len(losses)
        self.bar.refresh()

    def mean(self, last: int | None = None) -> float:
        """Mean loss of the last `last` steps (default: the window)."""
        return float(np.mean(self.losses[-(last or self.window):]))

    def __enter__(self) -> "LossProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def logger():
    """The flow run's logger (shown on the dashboard) inside one, else mirage's."""
    import logging

    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("mirage")


def report_errors(stage: str, table: str | Path, stats) -> None:
    """A stage's failed items (a store's UpdateStats.failed), in its log and,
    inside a flow run, as a table artifact `<stage>-errors` on the dashboard."""
    if not stats.failed:
        return
    from prefect.context import FlowRunContext

    log = logger()
    rows = [{"id": item, "stage": stage, "reason": why} for item, why in stats.failed.values()]
    log.warning("%s: %d of %d items failed (listed in %s/errors.parquet, retried by the next run): %s", stage,
                len(rows), stats.wanted, table, "; ".join(f"{r['id']}: {r['reason']}" for r in rows[:3]))
    if FlowRunContext.get() is not None:
        from prefect.artifacts import create_table_artifact

        try:
            create_table_artifact(rows[:200], key=f"{stage}-errors",
                                  description=f"{len(rows)} of {stats.wanted} items failed in {table} (first 200)")
        except Exception:  # the dashboard is a view: never fail a stage over it
            pass


POOL_ENV = "MIRAGE_POOL"


def pool_dir(stage: str) -> Path:
    """Where a stage keeps rows it no longer outputs (for switching back):
    `.mirage/pool/<stage>` under the working directory (the project root), or
    under $MIRAGE_POOL.  Outside every DVC output, so outputs stay identical to
    a from-scratch run; delete it any time to reclaim disk."""
    return Path(os.environ.get(POOL_ENV, ".mirage/pool")) / stage
