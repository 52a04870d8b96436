"""Scale-out: Dask workers write the local runner's bytes, load each model once,
survive a killed worker; independent stages run at the same time; data moves
between clones through a DVC remote."""
from __future__ import annotations

import contextlib
import hashlib
import re
import sys
from pathlib import Path

import pytest
from conftest import FROZEN, ROOT, TINY, UNFROZEN, flatten, make_project

from mirage.data import params as params_mod
from mirage.run.runner import shared_cluster

pytestmark = pytest.mark.slow  # Dask clusters and three projects

# 30 images in batches of 4: 8 batches for generate and for features
SMALL = flatten({**TINY, "generate": {"per_prompt": 10, "steps": 5, "batch_size": 4}, "features": {"batch_size": 4}}) | {
    "generate.model": str(ROOT / "models" / "generator"), "features.encoder": str(ROOT / "models" / "encoder")}


def digests(root: Path) -> dict[str, str]:
    """Every file under root (the pool aside) -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".mirage" not in p.parts and ".dvc" not in p.parts}


def run_item_stages(out: Path, kind: str, stages=("generate", "features", "discover")) -> dict[str, dict]:
    """generate -> features -> discover into `out` on runner `kind`."""
    from flows.discover import discover_flow
    from flows.features import features_flow
    from flows.generate import generate_flow

    p = params_mod.load(ROOT / "params.yaml", SMALL | {"runner.kind": kind})
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    with contextlib.chdir(out), shared_cluster(p.runner):  # the stores' pool lives under the working directory  # what a pipeline run does: one cluster for its stages
        if "generate" in stages:
            done["generate"] = generate_flow(p.generate, str(out / "images"), p.runner)
        if "features" in stages:
            done["features"] = features_flow(p.features, str(out / "images"), p.generate.model, str(out / "features"),
                                             p.runner)
        if "discover" in stages:
            done["discover"] = discover_flow(p.discover, p.features, str(out / "images"), str(out / "features"),
                                             str(out / "objects"), str(out / "objects.coco.json"), p.runner)
    return done


@pytest.fixture(scope="module")
def local_outputs(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("local")
    return out, run_item_stages(out, "local")


def test_dask_workers_write_the_local_runners_bytes(local_outputs, tmp_path):
    local, local_counts = local_outputs
    counts = run_item_stages(tmp_path / "dask", "dask")
    assert digests(tmp_path / "dask") == digests(local)
    assert len(digests(local)) >= 7  # three tables (manifest + shard each) and the COCO file
    for stage in ("generate", "features", "discover"):
        assert counts[stage]["computed"] == local_counts[stage]["computed"] == 30
        assert local_counts[stage]["model_loads"] == 1
    # 2 workers, 8 batches: each worker loads the model once, whatever number of batches it gets
    assert 1 <= counts["generate"]["model_loads"] <= 2
    assert 1 <= counts["features"]["model_loads"] <= 2
    print("model loads on 2 workers:", {s: c["model_loads"] for s, c in counts.items()})


def test_a_killed_worker_costs_no_batch_and_no_byte(local_outputs, tmp_path, monkeypatch):
    """A worker dies by SIGKILL at its second batch (as a pre-empted machine
    would): Dask reruns its batch elsewhere, the stage completes, bytes equal."""
    marker = tmp_path / "killed"
    monkeypatch.setenv("MIRAGE_FAULT", "dask-batch@2")
    monkeypatch.setenv("MIRAGE_FAULT_MARKER", str(marker))  # one kill in all workers together
    local, _ = local_outputs
    counts = run_item_stages(tmp_path / "dask", "dask", stages=("generate",))
    assert marker.exists(), "no worker was killed: the fault point was not reached"
    assert counts["generate"]["computed"] == 30
    assert {k: v for k, v in digests(tmp_path / "dask").items() if k.startswith("images")} == \
           {k: v for k, v in digests(local).items() if k.startswith("images")}
    assert not list((tmp_path / "dask").rglob("*.tmp-*"))


def stage_runs(flow_run_id: str) -> dict[str, tuple]:
    """Child flow runs of a pipeline run: stage name -> (start, end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        names = {f.id: f.name for f in client.read_flows()}
    return {names[r.flow_id]: (r.start_time, r.end_time) for r in runs}


def pipeline_run_id(root: Path) -> str:
    """The newest `mirage-pipeline` flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mirage-pipeline"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return str(runs[0].id)


def test_independent_stages_run_at_the_same_time(finished, tmp_path):
    """toyworld and generate read nothing of each other (the generator is a
    committed model): the pipeline run (the finished tiny project's, with the
    default runner.parallel_stages, 2) computes them at the same time, each a
    child flow run.  dvc.lock ends byte-identical to a run that takes one
    stage at a time."""
    from flows import pipeline

    def interval(results, name):
        return results[name].started, results[name].started + results[name].seconds

    assert params_mod.load(finished.root / "params.yaml").runner.parallel_stages == 2
    (t0, t1), (g0, g1) = interval(finished.results, "toyworld"), interval(finished.results, "generate")
    assert t0 < g1 and g0 < t1, f"toyworld {t0}..{t1} and generate {g0}..{g1} did not overlap"
    print(f"toyworld and generate computed side by side for {min(t1, g1) - max(t0, g0):.1f} s")
    assert {"toyworld", "generate"} <= set(stage_runs(finished.flow_run_id))  # both child runs of the pipeline run

    sequential = make_project(tmp_path, TINY | {"runner": {"parallel_stages": 1}})
    results = {r.name: r for r in pipeline.run(sequential)}
    assert [name for name, r in results.items() if r.ran] == UNFROZEN
    assert interval(results, "toyworld")[1] <= interval(results, "generate")[0]  # one at a time: the control
    runs = stage_runs(pipeline_run_id(sequential))
    assert runs["toyworld"][1] <= runs["generate"][0]  # and so are their flow runs
    assert (sequential / "dvc.lock").read_bytes() == (finished.root / "dvc.lock").read_bytes()


def test_remote_push_then_a_fresh_clone_pulls_and_runs_nothing(finished, tmp_path, capsys):
    """`mirage push` to a local-folder remote; a fresh clone (git) runs `mirage
    pull`: `dvc status` is clean and `mirage run` executes no stage."""
    import shutil
    import subprocess

    from dvc.repo import Repo

    from mirage.cli import main as cli_main

    source = tmp_path / "source"
    shutil.copytree(finished.root, source, symlinks=True, ignore=shutil.ignore_patterns(".mirage", "tmp"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=source, check=True)
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run(dvc + ["config", "core.no_scm", "false"], cwd=source, check=True)  # the fixture has no git
    assert cli_main(["--root", str(source), "push"]) == 2  # no remote yet: says how to add one
    remote = tmp_path / "remote"
    subprocess.run(dvc + ["remote", "add", "-d", "storage", str(remote)], cwd=source, check=True)  # as README
    with contextlib.chdir(source), Repo(str(source)) as repo:  # as in the real project, dvc.lock records the models
        for stage in FROZEN:
            repo.commit(stage, force=True)
    (source / ".gitignore").write_text("/data/\n/models/detector/\n/.mirage/\n/.dvc/cache/\n/.dvc/tmp/\n")
    subprocess.run(git + ["add", "-A"], cwd=source, check=True)
    subprocess.run(git + ["commit", "-qm", "project"], cwd=source, check=True)
    assert cli_main(["--root", str(source), "push"]) == 0
    assert any(remote.rglob("*"))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(source), str(clone)], check=True)
    assert not (clone / "data").exists()
    capsys.readouterr()
    assert cli_main(["--root", str(clone), "pull"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"pulled [1-9]\d* file", said) and "nothing stale" in said, said
    with Repo(str(clone)) as repo:
        assert repo.status() == {}
    from flows import pipeline

    assert not any(r.ran for r in pipeline.run(clone))
    assert digests(clone / "data") == digests(source / "data")
