"""DVC experiments on a mirage project: `dvc exp run -S` runs the stages under
DVC's experiment workspace, `dvc exp show` lists mirage's params and metrics,
and a `mirage run` is saved as an experiment named like its flow run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from flows import pipeline

pytestmark = pytest.mark.slow  # dvc exp runs


def sh(root: Path, *cmd: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture
def repo(done, tmp_path) -> Path:
    """The finished tiny project as a git repository, as a user keeps it."""
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    shutil.copy(ROOT / ".gitignore", root)
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "test@mirage")
    sh(root, "git", "config", "user.name", "mirage test")
    sh(root, "dvc", "config", "core.no_scm", "false")
    sh(root, "dvc", "commit", "--force", "--quiet")  # with git now: DVC git-ignores its outputs (models/detector)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny project")
    return root


def scalars(metrics: dict) -> dict:
    """The metrics as DVC shows them: lists (the per-round ones, intervals) are
    left out, and so is a dict left empty by that."""
    out = {}
    for k, v in metrics.items():
        v = scalars(v) if isinstance(v, dict) else v
        if not isinstance(v, list) and v != {}:
            out[k] = v
    return out


def experiments(root: Path) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its params.yaml values and metrics."""
    out = {}
    for baseline in json.loads(sh(root, "dvc", "exp", "show", "--json")):
        for exp in [baseline] + [e for group in baseline.get("experiments") or [] for e in group["revs"]]:
            data = exp["data"]
            name = exp.get("name") or data.get("name") or exp["rev"]
            out[name] = {"params": data["params"]["params.yaml"]["data"],
                         "metrics": (data["metrics"].get("metrics/evaluate.json") or {}).get("data")}
    return out


def test_dvc_exp_run_and_a_mirage_run_are_experiments_exp_show_lists_with_their_metrics(repo):
    """`dvc exp run -S` (DVC runs the stage commands), then a `mirage run`
    (saved as an experiment named like its flow run): `dvc exp show` lists
    both with their params and the metrics their runs wrote."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    base = json.loads((repo / "metrics/evaluate.json").read_text())
    sh(repo, "dvc", "exp", "run", "-n", "grid-3", "-S", "evaluate.grid_images=3")
    assert [r.name for r in pipeline.run(repo, {"evaluate.grid_images": 7}) if r.ran] == ["evaluate"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mirage-pipeline"])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert f"exp:{run.name}" in run.tags
    shown = experiments(repo)
    for name, grid in (("grid-3", 3), (run.name, 7)):
        assert shown[name]["params"]["evaluate"]["grid_images"] == grid
        # metrics are versioned (not `!`), and are the run's own: grid_images draws, it changes no metric
        assert shown[name]["metrics"] == scalars(base)
    assert base == json.loads((repo / "metrics/evaluate.json").read_text())
    assert "discovery.corloc" in sh(repo, "dvc", "metrics", "diff", "grid-3", run.name, "--all", "--json")
