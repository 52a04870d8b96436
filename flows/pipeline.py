"""The whole pipeline as one Prefect flow: `mirage run`, `mirage serve` and
`prefect deploy` (prefect.yaml) all run this.

DVC decides what is stale; each stale stage runs as a child flow run and is
recorded in dvc.lock; the run is tagged (commit, params digest, profile), its
outputs recorded as Prefect assets, and it ends with a summary, a metrics table
and pictures as artifacts (mirage/report.py).  A failed run names the stage
and the cause, and posts them to `alerts.webhook` when one is set.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mirage import pipeline, report
from mirage import params as params_mod


def alert_on_failure(flow, flow_run, state) -> None:
    """on_failure hook: tell `alerts.webhook` which stage failed and why."""
    root = Path(flow_run.parameters.get("root", "."))
    try:
        webhook = params_mod.load(root / "params.yaml").alerts.webhook
    except params_mod.ParamsError:
        return
    err = state.result(raise_on_failure=False)
    stage = err.stage if isinstance(err, pipeline.StageFailed) else None
    cause = str(err) if isinstance(err, BaseException) else state.message or "failed"
    report.alert(webhook, {
        "text": f"mirage pipeline run {flow_run.name} failed: {cause}",
        "flow_run": flow_run.name, "flow_run_id": str(flow_run.id), "project": str(root.resolve()),
        "stage": stage, "cause": cause, "tags": list(flow_run.tags),
    })


@flow(name="mirage-pipeline", on_failure=[alert_on_failure], log_prints=True)
def mirage_pipeline(root: str = ".", overrides: dict[str, Any] | None = None, force: bool = False,
                    train: list[str] | None = None) -> list[pipeline.StageResult]:
    """Set `overrides` in params.yaml (like `-S`), then run what is stale."""
    log = get_run_logger()
    start = time.perf_counter()
    root_path = Path(root).resolve()
    with contextlib.chdir(root_path), pipeline.run_lock(root_path):  # a scheduled run: one at a time too
        previous = report.read_metrics(root_path)
        params = pipeline.prepare(root_path, overrides or {}, tuple(train or ()))
        tags = report.run_tags(root_path, params)
        report.tag_this_run(tags)
        producers = {}

        def after_stage(repo, stage, result):
            if not producers:
                producers.update({o.def_path: s.name for s in repo.index.stages for o in s.outs})
            report.record_assets(root_path, stage, producers, params)

        results = pipeline.run_stages(root_path, force, tuple(train or ()), on_stage=after_stage, params=params)
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
