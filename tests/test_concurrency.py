"""Two runs on one workspace: the second exits at once with a message and
touches nothing (params.yaml included); the first completes, and what it
recorded matches the bytes on disk (`dvc status` clean)."""
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

pytestmark = pytest.mark.slow  # three full runs in subprocesses


def env() -> dict[str, str]:
    from mirage.run.server import configured_api

    return {**{k: v for k, v in os.environ.items() if not k.startswith("MIRAGE_FAULT")},
            "PREFECT_API_URL": configured_api(),  # the session's test server
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # dvc.yaml's `python`


def start(root: Path, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=root, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


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
    first = start(project, "-m", "mirage.cli", "run", "-S", "generate.per_prompt=9", log=tmp_path / "first.log")
    lock = project / ".mirage" / "run.lock"
    wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), "the first run's lock")
    wait_for(lambda: "per_prompt: 9" in (project / "params.yaml").read_text(), "the first run's overrides")
    params = (project / "params.yaml").read_bytes()
    second = second_run(project, "discover.tau=0.5")
    assert second.returncode == 2
    assert f"another mirage run or a stage of `dvc repro` (pid {first.pid}" in second.stderr and "params.yaml is as it was" in second.stderr
    assert (project / "params.yaml").read_bytes() == params  # tau not written beside the first run
    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert dvc_clean(project) == {}  # every output is what dvc.lock recorded
    assert scheduler.stale(project) == {}


def test_mirage_run_beside_dvc_repro(project, tmp_path):
    from mirage.data.params import write_overrides

    write_overrides(project / "params.yaml", {"generate.per_prompt": 9})
    repro = start(project, "-m", "dvc", "repro", log=tmp_path / "repro.log")
    lock = project / ".mirage" / "run.lock"
    # DVC unlocks its repo while a stage command runs; the command (`python -m flows.generate`) takes mirage's
    wait_for(lambda: lock.exists() and lock.read_text().startswith("pid"), "dvc repro's stage command")
    params = (project / "params.yaml").read_bytes()
    for overrides in ((), ("discover.tau=0.5",)):
        second = second_run(project, *overrides)
        assert second.returncode == 2, second.stderr
        assert "`dvc repro`" in second.stderr and "is using" in second.stderr and "this run did nothing" in second.stderr
    assert (project / "params.yaml").read_bytes() == params
    assert repro.wait(timeout=900) == 0, (tmp_path / "repro.log").read_text()[-3000:]
    assert dvc_clean(project) == {}


def test_dvc_repro_beside_mirage_run_is_refused_by_dvc(project, tmp_path):
    first = start(project, "-m", "mirage.cli", "run", "-S", "generate.per_prompt=9", log=tmp_path / "first.log")
    wait_for(lambda: "stage generate: running" in (tmp_path / "first.log").read_text(), "the first run's stages")
    repro = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env(), capture_output=True,
                           text=True, timeout=300)
    assert repro.returncode != 0 and "lock" in (repro.stdout + repro.stderr).lower()
    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert dvc_clean(project) == {}
