"""Run the stale stages of dvc.yaml as one Prefect parent flow with a child flow per stage.

DVC decides staleness (`Repo.status`) and records what produced what
(`Repo.commit` writes dvc.lock exactly as `dvc repro` would); Prefect runs the
stages in-process, so one pipeline run pays for one Prefect client, and a run
with nothing stale never starts Prefect at all.  DVC's repo lock is held for
the whole run, so `mirage run` and `dvc repro` on one workspace serialise.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from mirage import params as params_mod


@dataclass
class StageResult:
    name: str
    ran: bool
    seconds: float = 0.0
    why: list[str] = field(default_factory=list)


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def stage_order(repo) -> list:
    """Stages in dvc.yaml order, checked to be a valid execution order."""
    stages = [s for s in repo.index.stages if s.cmd]
    graph = repo.index.graph  # edges: stage -> a stage it depends on
    seen = set()
    for stage in stages:
        for upstream in graph.successors(stage):
            if upstream.cmd and upstream not in seen:
                raise RuntimeError(f"dvc.yaml lists stage {stage.name!r} before {upstream.name!r}, which it depends on")
        seen.add(stage)
    return stages


def describe(status: dict) -> dict[str, list[str]]:
    """DVC's status dict -> stage name: human-readable reasons."""
    out: dict[str, list[str]] = {}
    for target, changes in status.items():
        name = target.split(":")[-1]
        reasons = []
        for change in changes:
            if isinstance(change, str):
                reasons.append(change)
                continue
            for kind, entries in change.items():
                if isinstance(entries, dict):
                    reasons += [f"{kind.replace('changed ', '')} {state}: {path}" for path, state in entries.items()]
                else:
                    reasons.append(f"{kind}: {entries}")
        out[name] = reasons
    return out


def stale(root: Path) -> dict[str, list[str]]:
    """What `dvc status` says, by stage name."""
    return describe(_repo(root).status())


def run_stage_inprocess(cmd: str) -> None:
    """Run `python -m flows.X ARGS` from dvc.yaml in this process (never via a shell)."""
    argv = shlex.split(cmd)
    if len(argv) < 3 or argv[:2] != ["python", "-m"] or not argv[2].startswith("flows."):
        raise ValueError(f"stage command {cmd!r} is not 'python -m flows.<stage> ...'")
    importlib.import_module(argv[2]).main(argv[3:])


def _pipeline(root: str, force: bool) -> list[StageResult]:
    from dvc.repo import lock_repo
    from prefect import get_run_logger

    log = get_run_logger()
    repo = _repo(Path(root))
    results = []
    with lock_repo(repo):
        for stage in stage_order(repo):
            why = describe(repo.status(targets=[stage.addressing]))
            if not why and not force:
                results.append(StageResult(stage.name, ran=False))
                continue
            log.info("stage %s: running (%s)", stage.name, "; ".join(why.get(stage.name, ["forced"]))[:500])
            start = time.perf_counter()
            run_stage_inprocess(stage.cmd)
            repo.commit(stage.addressing, force=True)
            repo._reset()  # re-read dvc.lock before the next stage's status
            results.append(StageResult(stage.name, True, time.perf_counter() - start, why.get(stage.name, [])))
    return results


def run(root: str | Path = ".", overrides: dict | None = None, force: bool = False) -> list[StageResult]:
    """Apply `-S` overrides to params.yaml, validate it, then run what is stale."""
    root = Path(root).resolve()
    with contextlib.chdir(root):
        if overrides:
            params_mod.write_overrides("params.yaml", overrides)
        params_mod.load("params.yaml")  # bad params fail here, before any work
        if not force and not stale(root):
            with _repo(root) as repo:
                return [StageResult(s.name, ran=False) for s in stage_order(repo)]
        from prefect import flow

        pipeline = flow(name="mirage-pipeline", log_prints=True)(_pipeline)
        return pipeline(str(root), force)


def summary(root: str | Path, results: list[StageResult], seconds: float) -> str:
    root = Path(root)
    ran = [r for r in results if r.ran]
    lines = [f"mirage: {len(ran)} stage(s) ran, {len(results) - len(ran)} up to date, {seconds:.1f} s"]
    for r in results:
        lines.append(f"  {r.name:<15} {'ran ' + format(r.seconds, '.1f') + ' s' if r.ran else 'up to date'}")
    metrics = root / "metrics" / "evaluate.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        lines += [
            "metrics (metrics/evaluate.json):",
            f"  discovery CorLoc      {m['discovery']['corloc']:.3f}  (same backbone with random weights "
            f"{m['discovery']['corloc_random_weights']:.3f}; {m['discovery']['backbone']})",
            f"  detector AP50 / AP    {m['detector']['ap50']:.3f} / {m['detector']['ap']:.3f}  (class-agnostic, toy test split)",
            "  AP50 by self-training round  " + " -> ".join(f"{r['ap50']:.3f}" for r in m["detector"]["rounds"]),
            f"  prompt alignment      {m['generation']['prompt_alignment']:.3f}",
        ]
    lines.append("outputs: data/ (tables), models/ (weights), metrics/, plots/ — `dvc metrics show`, `dvc plots show`")
    return "\n".join(lines)
