"""Crash-resume by real SIGKILL (mirage/run/faults.py): a stage process killed at
each named point resumes without redoing finished items, ends byte-identical
to an uninterrupted run, leaves no temp file, and readers never see a
half-written file."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT

from mirage.data.store import MANIFEST, WORK, read_table
from mirage.run.stage import RESULT

pytestmark = pytest.mark.slow  # a stage process per kill point

# one tiny stage process: a store filling 10 items in batches of 3
STORE_SCRIPT = """
import sys, pyarrow as pa
import mirage.run.faults  # the harness: MIRAGE_FAULT acts at the store's interruption points
from mirage.data.store import ShardStore
schema = pa.schema([("key", pa.string()), ("value", pa.int64())])
def compute(specs):
    print("computed", *specs, flush=True)
    return pa.table({"key": [f"k{s}" for s in specs], "value": [s * s for s in specs]}, schema=schema)
store = ShardStore(sys.argv[1], schema, {"stage": "test"}, shard_rows=4)
stats = store.update([(f"k{i}", i) for i in range(10)], compute, batch_size=3)
print("stats", stats.computed, stats.reused, flush=True)
"""


def temps(root: Path) -> list[str]:
    """Temp files or folders (a killed write's leftovers) anywhere under root."""
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def readable(table_root: Path) -> None:
    """What a reader sees mid-crash: the manifest (if any) names only whole
    files, and every visible Parquet file opens in pyarrow and polars."""
    if (table_root / MANIFEST).exists():
        read_table(table_root)
        for shard in json.loads((table_root / MANIFEST).read_text())["shards"]:
            pl.read_parquet(table_root / shard["file"])
    for path in table_root.rglob("*.parquet"):
        if not path.name.startswith("."):
            pq.read_table(path)


def store_process(root: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "MIRAGE_FAULT": fault} if fault else {k: v for k, v in os.environ.items() if k != "MIRAGE_FAULT"}
    return subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(root)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fault, finished", [
    ("batch@2", 3),  # mid-batch: the first batch was saved, the second is lost
    ("batch-saved@2", 6),  # right after the second batch reached the work area
    ("shards-written", 10),  # every shard written, the manifest not yet
    ("manifest-replace", 10),  # the new manifest written under its temp name, not yet renamed
])
def test_store_killed_at_each_point_resumes_exactly(tmp_path, fault, finished):
    reference = tmp_path / "reference"
    assert store_process(reference).returncode == 0
    root = tmp_path / "table"
    killed = store_process(root, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    readable(root)
    resumed = store_process(root)
    assert resumed.returncode == 0, resumed.stderr
    computed = [line for line in resumed.stdout.splitlines() if line.startswith("computed")]
    assert sum(len(line.split()) - 1 for line in computed) == 10 - finished  # finished items are not redone
    assert f"stats {10 - finished} {finished}" in resumed.stdout
    assert files(root) == files(reference) and temps(root) == []


def test_model_directory_killed_mid_swap_is_rebuilt_without_leftovers(tmp_path):
    script = ("import sys; from pathlib import Path; import mirage.run.faults; from mirage.data.store import atomic_dir\n"
              "with atomic_dir(Path(sys.argv[1])) as tmp: (tmp / 'weights').write_text(sys.argv[2])\n")
    out = tmp_path / "model"

    def save(text: str, fault: str = "") -> int:
        env = {**os.environ, "MIRAGE_FAULT": fault}
        return subprocess.run([sys.executable, "-c", script, str(out), text], cwd=ROOT, env=env, timeout=60).returncode

    assert save("old") == 0
    assert save("new", "model-swap") == -signal.SIGKILL
    assert not out.exists() and len(temps(tmp_path)) == 2  # a reader finds no model (its stage is stale), never half of one
    assert save("new") == 0
    assert (out / "weights").read_text() == "new" and temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# The stages themselves, as `dvc repro` runs them: `python -m flows.<stage> ...` processes killed in turn at
# every point, then run to the end.

STAGE_TABLES = {"toyworld": ["data/toyworld/train", "data/toyworld/test"], "generate": ["data/generated"],
                "features": ["data/features"], "discover": ["data/discovery"], "concepts": ["data/concepts/chunks"]}
STAGE_FILES = {"discover": ["data/discovery.coco.json"],
               "concepts": ["data/concepts/measures.json", "data/concepts/pairs.parquet", "plots/concepts.png"]}  # whole files a stage writes beside its tables
# each stage killed at these points in turn (the tiny project: toyworld renders a batch per split, generate and
# features have 3 batches of 8 images, discover one batch of 24).  Each stage is killed twice or more, mid-batch,
# after a saved batch or at the store's own points (shards written, manifest renamed: every one of them on the bare
# store above too); the final run computes only what no killed run saved (a process apiece costs ~10 s)
CHAINS = {  # stage: (its kill points in turn, the items no killed run saved, computed by the final run)
    "toyworld": (["batch@2", "batch-saved@1", "shards-written@1", "manifest-replace@1"], 0),
    "generate": (["batch@2", "batch-saved@1"], 8),  # 2 of its 3 batches saved
    "features": (["batch@2", "shards-written"], 0),
    "discover": (["batch-saved@1", "manifest-replace"], 0),
    "concepts": (["batch@2"], 1),  # two chunks (16 + 8 images): the first saved, the second computed by the final run
}


def stage_command(root: Path, stage: str) -> list[str]:
    cmd = shlex.split(yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return [sys.executable, *cmd[1:]]


def run_stage(root: Path, stage: str, fault: str = "") -> subprocess.CompletedProcess:
    from mirage.run.server import configured_api

    env = {k: v for k, v in os.environ.items() if k not in ("MIRAGE_FAULT", "MIRAGE_FAULT_MARKER")}
    env["PREFECT_API_URL"] = configured_api()  # the session's test server: no temporary server per process
    if fault:
        env["MIRAGE_FAULT"] = fault
    return subprocess.run(stage_command(root, stage), cwd=root, env=env, capture_output=True, text=True, timeout=600)


def work_keys(root: Path, tables: list[str]) -> set[str]:
    keys = set()
    for table in tables:
        for path in (root / table / WORK).glob("batch-*.parquet"):
            keys |= set(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


@pytest.mark.parametrize("stage", list(CHAINS))
def test_stage_killed_at_every_point_resumes_byte_identical(done, tmp_path, stage):
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    tables = STAGE_TABLES[stage]
    reference = {t: files(done / t) for t in tables}
    extra = STAGE_FILES.get(stage, [])
    reference |= {f: (done / f).read_bytes() for f in extra}
    for table in tables:
        shutil.rmtree(root / table)
    for name in extra:
        (root / name).unlink()
    shutil.rmtree(root / ".mirage" / "pool" / stage, ignore_errors=True)  # no rows to restore: all computed again
    saved: set[str] = set()
    points, left = CHAINS[stage]
    for fault in points:
        killed = run_stage(root, stage, fault)
        assert killed.returncode == -signal.SIGKILL, f"{fault}: {killed.stderr[-2000:]}"
        for table in tables:
            readable(root / table)
        now = work_keys(root, tables)
        assert saved <= now or (root / tables[-1] / MANIFEST).exists()  # saved batches are kept until final
        if fault.startswith("batch-saved"):
            assert len(now) > len(saved)  # it computed a batch that was not saved before, not one again
        saved = now
    final = run_stage(root, stage)
    assert final.returncode == 0, final.stderr[-3000:]
    result = json.loads(final.stdout.split(RESULT)[-1])
    counts = list(result.values()) if stage == "toyworld" else [result]
    assert sum(c["computed"] for c in counts) == left  # what the killed runs saved is not redone
    assert {t: files(root / t) for t in tables} | {f: (root / f).read_bytes() for f in extra} == reference
    assert temps(root / "data") == [] and temps(root / ".mirage") == []


def test_curate_killed_mid_swap_is_rebuilt_byte_identical(done, tmp_path):
    """Stage curate writes its folder whole (a temp folder swapped in): killed
    at the swap, no half folder is read, and the rerun makes the same bytes."""
    from mirage.data.params import write_overrides

    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    write_overrides(root / "params.yaml", {"curate.enabled": True, "curate.clusters": [6, 2], "curate.target": 12})
    assert run_stage(root, "curate").returncode == 0
    reference = files(root / "data/curated")
    assert set(reference) == {"curated.parquet", "state.json", "duplicates.png"}
    shutil.rmtree(root / "data/curated")
    killed = run_stage(root, "curate", "model-swap")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (root / "data/curated").exists()  # the temp folder is not swapped in half-way
    final = run_stage(root, "curate")
    assert final.returncode == 0, final.stderr[-3000:]
    assert files(root / "data/curated") == reference and temps(root / "data") == []


def processes_with(tag: str) -> list[int]:
    """Live processes whose environment holds `tag` (children inherit it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_killed_stage_leaves_no_prefect_server_behind(tiny_project, tmp_path):
    """Without a configured API a stage process starts Prefect's temporary
    server; killed by SIGKILL, its server ends too (it used to live on,
    re-parented to init)."""
    import time
    import uuid

    tag = f"MIRAGE_ORPHAN_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MIRAGE_FAULT"))}
    env |= {"MIRAGE_FAULT": "batch@1", "PREFECT_HOME": str(tmp_path / "prefect-home"), tag.split("=")[0]: tag.split("=")[1]}
    log = tmp_path / "stage.log"
    with log.open("w") as out:  # a file, not a pipe: an orphan holding a pipe open would block run() here
        killed = subprocess.run(stage_command(tiny_project, "toyworld"), cwd=tiny_project, env=env,
                                stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    deadline = time.monotonic() + 30
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with(tag) == []


def test_training_killed_resumes_from_its_checkpoint_byte_identical(done, tmp_path):
    """train_detector (tiny: 8 steps, then a self-training round of 4) killed
    at step 3 of round 1 resumes at step 2 (checkpoints every 2 steps); killed
    while its model directory is swapped in, the rerun trains nothing; both
    end with the uninterrupted run's bytes and no temp or checkpoint left."""
    from mirage.data.params import write_overrides

    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    write_overrides(root / "params.yaml", {"runner.checkpoint_every": 2})  # runner: no stage's parameter
    reference = files(done / "models" / "detector")
    shutil.rmtree(root / "models" / "detector")
    killed = run_stage(root, "train_detector", "train-step@11")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (root / "models" / "detector").exists()
    resumed = run_stage(root, "train_detector", "model-swap@3")  # the rounds saved (1, 2), then the output (3)
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-2000:]
    assert "round 1: resumed from its checkpoint at step 2 of 4" in resumed.stderr
    assert "round 0: resumed from its checkpoint at step 8 of 8" in resumed.stderr  # round 0 was finished
    final = run_stage(root, "train_detector")
    assert final.returncode == 0, final.stderr[-3000:]
    assert "round 1: resumed from its checkpoint at step 4 of 4" in final.stderr  # nothing trained again
    assert files(root / "models" / "detector") == reference
    assert temps(root / "models") == [] and not list((root / ".mirage" / "checkpoints").rglob("*.pt"))


@pytest.mark.parametrize("stage, model", [("train_generator", "generator"), ("train_encoder", "encoder")])
def test_toy_model_training_killed_resumes_from_its_checkpoint(done, tmp_path, stage, model):
    """The frozen toy models' trainings (tiny: 2 steps, a checkpoint after each)
    killed at their second step resume at step 1 and save the bytes an
    uninterrupted training saves."""
    from mirage.data.params import write_overrides

    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    write_overrides(root / "params.yaml", {"runner.checkpoint_every": 1})
    shutil.rmtree(root / "models" / model)
    assert run_stage(root, stage).returncode == 0
    reference = files(root / "models" / model)
    shutil.rmtree(root / "models" / model)
    killed = run_stage(root, stage, "train-step@2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_stage(root, stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from its checkpoint at step 1 of 2" in resumed.stderr
    assert files(root / "models" / model) == reference
    assert temps(root / "models") == [] and not list((root / ".mirage" / "checkpoints").rglob("*.pt"))
