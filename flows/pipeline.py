"""The whole pipeline as one Prefect flow: `mirage run`, `mirage serve` and
`prefect deploy` (prefect.yaml) all run this.

DVC decides what is stale; each stale stage runs as a child flow run and is
recorded in dvc.lock; the run is tagged (commit, params digest, profile, and
whose it is: project, workspace, process — mirage/run/liveness.py), its
outputs recorded as Prefect assets, and it ends with a summary, a metrics table
and pictures as artifacts (mirage/run/report.py).  A failed run names the stage
and the cause, and posts them to `alerts.webhook` when one is set.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import shlex
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect import tags as prefect_tags

from mirage.data import params as params_mod
from mirage.run import liveness, report, scheduler, trends
from mirage.run.server import connect, running


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


def mark_crashed(root: Path, log) -> None:
    """Holding the run lock, no other run of this workspace is alive: those
    still Running on the dashboard are marked Crashed (mirage/run/liveness.py)."""
    try:
        crashed = liveness.mark_crashed(root)
    except Exception as err:  # the run goes on without it
        log.warning("could not check this workspace's earlier runs (%s: %s)", type(err).__name__, err)
        return
    if crashed:
        log.warning("marked Crashed: %s (earlier runs of this workspace whose process died)", ", ".join(crashed))


def alert_on_drop(root: Path, params: params_mod.Params, tags: list[str]) -> None:
    """A metric that fell by more than `alerts.max_drop` from the last run
    with these params: the webhook hears it (the failure payload's shape,
    with the metric, its old and new value)."""
    from prefect.runtime import flow_run

    fell = trends.drops(trends.history(root, None), params.alerts.max_drop)
    if not fell:
        return
    get_run_logger().warning("metrics fell: %s", "; ".join(
        f"{d['metric']} {d['old']:.3f} -> {d['new']:.3f} (run {d['compared_with']})" for d in fell))
    for d in fell:
        report.alert(params.alerts.webhook, {
            "text": f"mirage pipeline run {flow_run.name}: {d['metric']} fell from {d['old']:.3f} to {d['new']:.3f} "
                    f"(more than alerts.max_drop={d['max_drop']}) since run {d['compared_with']} with the same params",
            "flow_run": flow_run.name, "flow_run_id": str(flow_run.id), "project": str(root), "stage": "evaluate",
            "cause": "metric drop", "tags": tags, **d})


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
    with contextlib.chdir(root_path), scheduler.run_lock(root_path), \
            scheduler.params_put_back_if_busy(root_path):  # a scheduled run: one at a time too
        previous = report.read_metrics(root_path)
        params = scheduler.prepare(root_path, overrides or {}, tuple(train or ()))
        whose = liveness.workspace_tags(root_path)
        tags = report.run_tags(root_path, params) + whose
        report.tag_this_run(tags)
        mark_crashed(root_path, log)
        producers = {}

        def after_stage(repo, stage, result):
            if not producers:
                producers.update({o.def_path: s.name for s in repo.index.stages for o in s.outs})
            report.record_assets(root_path, stage, producers, params)

        with prefect_tags(*whose):  # the stage runs': whose they are
            results = scheduler.run_stages(root_path, run_stage_inprocess, force, tuple(train or ()),
                                           on_stage=after_stage, params=params, load_stage=stage_module)
        seconds = time.perf_counter() - start
        if any(r.ran for r in results):
            from prefect.runtime import flow_run

            exp = report.save_experiment(root_path, flow_run.name)  # `dvc exp show` lists it by this name
            if exp:
                tags.append(f"exp:{exp}")
                report.tag_this_run(tags)
            trends.record(root_path, flow_run.name, tags, results, report.read_metrics(root_path))
            report.publish(root_path, results, seconds, previous, tags)
            alert_on_drop(root_path, params, tags)
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
    with contextlib.chdir(root), scheduler.run_lock(root), scheduler.params_put_back_if_busy(root):
        scheduler.prepare(root, overrides, train)  # validates, checks changed models, writes the overrides
        if not force and not train:
            from dvc.lock import LockError

            try:
                # a `dvc repro` started beside this run after it wrote params.yaml: let it end first, and ask
                # `dvc status` under the same hold (it takes DVC's lock: a repro starting in between refused this run)
                with scheduler.open_repo(root) as repo, scheduler.workspace_lock(repo, wait=scheduler.dvc_wait(root)):
                    nothing = not scheduler.stale_in(repo)
            except LockError:  # a run in progress
                raise scheduler.busy(root) from None
            if nothing:
                if running(root):  # a dashboard that outlives runs: a killed one may still read Running there
                    connect(root)
                    mark_crashed(root, logging.getLogger("mirage"))
                with scheduler.open_repo(root) as repo:
                    return [scheduler.StageResult(s.name, ran=False) for s in scheduler.stage_order(repo)]
        connect(root)
        return mirage_pipeline(str(root), force=force, train=list(train))
