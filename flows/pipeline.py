"""The whole pipeline as one Prefect flow: `mirage run`, `mirage serve` and
`prefect deploy` (prefect.yaml) all run this.

DVC decides what is stale; each stale stage runs as a child flow run and is
recorded in dvc.lock; the run is tagged (commit, params digest, profile), its
outputs recorded as Prefect assets, and it ends with a summary, a metrics table
and pictures as artifacts (mirage/run/report.py).  A failed run names the stage
and the cause, and posts them to `alerts.webhook` when one is set.
"""
from __future__ import annotations

import contextlib
import importlib
import shlex
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mirage.data import params as params_mod
from mirage.run import report, scheduler
from mirage.run.server import connect


def stage_module(cmd: str):
    """The module of a `python -m flows.X ARGS` command from dvc.yaml, imported, and ARGS."""
    argv = shlex.split(cmd)
    if len(argv) < 3 or argv[:2] != ["python", "-m"] or not argv[2].startswith("flows."):
        raise ValueError(f"stage command {cmd!r} is not 'python -m flows.<stage> ...'")
    return importlib.import_module(argv[2]), argv[3:]


def run_stage_inprocess(cmd: str):
    """Run `python -m flows.X ARGS` from dvc.yaml in this process (never via a
    shell); returns what the stage's flow returned."""
    module, args = stage_module(cmd)
    return module.main(args)


def alert_on_failure(flow, flow_run, state) -> None:
    """on_failure hook: tell `alerts.webhook` which stage failed and why."""
    root = Path(flow_run.parameters.get("root", "."))
    try:
        webhook = params_mod.load(root / "params.yaml").alerts.webhook
    except params_mod.ParamsError:
        return
    err = state.result(raise_on_failure=False)
    stage = err.stage if isinstance(err, scheduler.StageFailed) else None
    cause = str(err) if isinstance(err, BaseException) else state.message or "failed"
    report.alert(webhook, {
        "text": f"mirage pipeline run {flow_run.name} failed: {cause}",
        "flow_run": flow_run.name, "flow_run_id": str(flow_run.id), "project": str(root.resolve()),
        "stage": stage, "cause": cause, "tags": list(flow_run.tags),
    })


@flow(name="mirage-pipeline", on_failure=[alert_on_failure], log_prints=True)
def mirage_pipeline(root: str = ".", overrides: dict[str, Any] | None = None, force: bool = False,
                    train: list[str] | None = None) -> list[scheduler.StageResult]:
    """Set `overrides` in params.yaml (like `-S`), then run what is stale."""
    log = get_run_logger()
    start = time.perf_counter()
    root_path = Path(root).resolve()
    with contextlib.chdir(root_path), scheduler.run_lock(root_path):  # a scheduled run: one at a time too
        previous = report.read_metrics(root_path)
        params = scheduler.prepare(root_path, overrides or {}, tuple(train or ()))
        tags = report.run_tags(root_path, params)
        report.tag_this_run(tags)
        producers = {}

        def after_stage(repo, stage, result):
            if not producers:
                producers.update({o.def_path: s.name for s in repo.index.stages for o in s.outs})
            report.record_assets(root_path, stage, producers, params)

        results = scheduler.run_stages(root_path, run_stage_inprocess, force, tuple(train or ()), on_stage=after_stage,
                                       params=params, load_stage=stage_module)
        seconds = time.perf_counter() - start
        if any(r.ran for r in results):
            from prefect.runtime import flow_run

            exp = report.save_experiment(root_path, flow_run.name)  # `dvc exp show` lists it by this name
            if exp:
                tags.append(f"exp:{exp}")
                report.tag_this_run(tags)
            report.publish(root_path, results, seconds, previous, tags)
        else:
            log.info("nothing stale: no stage ran (%.1f s)", seconds)
    return results


def run(root: str | Path = ".", overrides: dict | None = None, force: bool = False,
        train: tuple[str, ...] = ()) -> list[scheduler.StageResult]:
    """Apply `-S` overrides to params.yaml, validate it, then run what is stale
    as one `mirage-pipeline` flow run (reported to the project's `mirage
    server` when it is up).  `train` names frozen stages (train_generator,
    train_encoder) to rerun too; `force` reruns every stage that is not frozen."""
    root = Path(root).resolve()
    with contextlib.chdir(root), scheduler.run_lock(root):
        scheduler.prepare(root, overrides, train)  # validates, checks changed models, writes the overrides
        if not force and not train:
            from dvc.lock import LockError

            try:
                nothing = not scheduler.stale(root)
            except LockError:  # a run in progress
                raise scheduler.busy(root) from None
            if nothing:
                with scheduler.open_repo(root) as repo:
                    return [scheduler.StageResult(s.name, ran=False) for s in scheduler.stage_order(repo)]
        connect(root)
        return mirage_pipeline(str(root), force=force, train=list(train))
