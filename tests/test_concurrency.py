"""Two runs on one workspace: the second exits at once with a message and
touches nothing (params.yaml included); the first completes, and what it
recorded matches the bytes on disk (`dvc status` clean).  The first run is
held at the start of its stage (MIRAGE_FAULT=stage-start:wait) while the
second is tried, so the race is certain on any machine, and it reruns one
stage only (evaluate)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import UNFROZEN

from mirage.run import scheduler

pytestmark = pytest.mark.slow  # runs in subprocesses

CHANGE = "evaluate.grid_images=5"  # what the first run changes: evaluate alone is stale


def env() -> dict[str, str]:
    from mirage.run.server import configured_api

    return {**{k: v for k, v in os.environ.items() if not k.startswith("MIRAGE_FAULT")},
            "PREFECT_API_URL": configured_api(),  # the session's test server
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # dvc.yaml's `python`


class Held:
    """The first process, paused where its stage starts until released."""

    def __init__(self, root: Path, *args: str, log: Path, at: str = "stage-start"):
        self.release, self.log = log.with_suffix(".release"), log
        hold = {"MIRAGE_FAULT": f"{at}:wait", "MIRAGE_FAULT_RELEASE": str(self.release)}
        self.proc = subprocess.Popen([sys.executable, *args], cwd=root, env=env() | hold, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        waiting = Path(f"{self.release}.waiting")
        wait_for(lambda: waiting.exists() or self.proc.poll() is not None, "the first process to reach its stage")
        assert self.proc.poll() is None, log.read_text()[-3000:]

    def finish(self) -> int:
        self.release.touch()
        code = self.proc.wait(timeout=600)
        assert code == 0, self.log.read_text()[-3000:]
        return code


def wait_for(check, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def second_run(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [x for o in overrides for x in ("-S", o)]
    return subprocess.run([sys.executable, "-m", "mirage.cli", "run", *args], cwd=root, env=env(),
                          capture_output=True, text=True, timeout=120)


def dvc_clean(root: Path) -> dict:
    """`dvc status` of the stages a run computes (the frozen models' copies are not this test's)."""
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", *UNFROZEN], cwd=root, env=env(),
                         capture_output=True, text=True, timeout=300)
    return yaml.safe_load(out.stdout)


def test_second_mirage_run_exits_and_touches_nothing(project, tmp_path):
    first = Held(project, "-m", "mirage.cli", "run", "-S", CHANGE, log=tmp_path / "first.log")
    lock = project / ".mirage" / "run.lock"
    assert lock.exists() and f"pid {first.pid}" in lock.read_text()
    assert "grid_images: 5" in (project / "params.yaml").read_text()  # the first run's override, written
    params = (project / "params.yaml").read_bytes()
    second = second_run(project, "discover.tau=0.5")
    assert second.returncode == 2
    assert f"another mirage run or a stage of `dvc repro` (pid {first.pid}" in second.stderr and "params.yaml is as it was" in second.stderr
    assert (project / "params.yaml").read_bytes() == params  # tau not written beside the first run
    first.finish()
    assert "stage evaluate: running" in first.log.read_text()
    assert dvc_clean(project) == {}  # every output is what dvc.lock recorded
    assert scheduler.stale(project) == {}


def test_mirage_run_beside_dvc_repro(project, tmp_path):
    from mirage.data.params import write_overrides

    write_overrides(project / "params.yaml", {"evaluate.grid_images": 5})
    repro = Held(project, "-m", "dvc", "repro", log=tmp_path / "repro.log")
    lock = project / ".mirage" / "run.lock"
    # DVC unlocks its repo while a stage command runs; the command (`python -m flows.evaluate`) takes mirage's
    assert lock.exists() and lock.read_text().startswith("pid")
    params = (project / "params.yaml").read_bytes()
    for overrides in ((), ("discover.tau=0.5",)):
        second = second_run(project, *overrides)
        assert second.returncode == 2, second.stderr
        assert "`dvc repro`" in second.stderr and "is using" in second.stderr and "this run did nothing" in second.stderr
    assert (project / "params.yaml").read_bytes() == params
    repro.finish()
    assert "Running stage 'evaluate'" in repro.log.read_text()
    assert dvc_clean(project) == {}


def test_dvc_repro_beside_mirage_run_is_refused_by_dvc(project, tmp_path):
    first = Held(project, "-m", "mirage.cli", "run", "-S", CHANGE, log=tmp_path / "first.log")
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(), capture_output=True,
                           text=True, timeout=300)
    assert repro.returncode != 0 and "lock" in (repro.stdout + repro.stderr).lower()
    first.finish()
    assert dvc_clean(project) == {}


def test_dvc_repro_started_after_a_run_wrote_params_never_ends_that_run(project, tmp_path):
    """The race of the issue: `mirage run` has taken its lock and written
    params.yaml when a `dvc repro` starts.  Whichever takes DVC's lock first,
    the mirage run completes (it waits for DVC's lock), and the `dvc repro`
    is refused before it records anything; tried at two offsets."""
    for grid, offset in ((5, 0.0), (6, 3.0)):
        first = Held(project, "-m", "mirage.cli", "run", "-S", f"evaluate.grid_images={grid}",
                     log=tmp_path / f"first-{grid}.log", at="params-written")
        lock = (project / "dvc.lock").read_bytes()
        with (tmp_path / f"repro-{grid}.log").open("w") as log:
            repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(), stdout=log,
                                     stderr=subprocess.STDOUT)
            time.sleep(offset)
            first.finish()  # exit 0, asserted
            assert repro.wait(timeout=300) != 0, (tmp_path / f"repro-{grid}.log").read_text()[-2000:]
        assert (project / "dvc.lock").read_bytes() != lock  # what the mirage run recorded, not dvc repro
        assert f"grid_images: {grid}" in (project / "params.yaml").read_text()
        assert dvc_clean(project) == {} and scheduler.stale(project) == {}
