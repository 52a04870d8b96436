"""Failing batches: a flaky batch is retried, a permanent failure names the
stage, the items and the cause, a batch out of memory names its batch-size
key, a full disk ends cleanly and the next run with space completes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import ROOT, TINY, flatten

from mirage import cli
from mirage.data import params as params_mod
from mirage.data.store import DiskFull, ShardStore, read_table
from mirage.run import faults

SCHEMA = pa.schema([("key", pa.string()), ("blob", pa.binary())])


def noise(specs):
    """Rows of 256 KB that do not compress."""
    return pa.table({"key": [f"k{s}" for s in specs], "blob": [_bytes(s) for s in specs]},
                    schema=SCHEMA)


def _bytes(seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).bytes(256 << 10)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (root can mount one; skipped where it cannot)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_full_disk_stops_cleanly_and_the_next_run_with_space_completes(small_disk, tmp_path):
    store = ShardStore(small_disk / "table", SCHEMA, {"stage": "test"}, shard_rows=4)
    wanted = [(f"k{i}", i) for i in range(12)]  # 3 MB of rows: more than the disk holds
    computed = []

    def compute(specs):
        computed.extend(specs)
        return noise(specs)

    with pytest.raises(DiskFull, match=r"no space left on the device writing .*table.*free some space"):
        store.update(wanted, compute, batch_size=2)
    leftovers = [p.name for p in small_disk.rglob("*") if ".tmp-" in p.name]
    assert leftovers == [] and not (small_disk / "table" / "manifest.json").exists()
    saved = len(computed) - 2  # the batch that did not fit is the only one lost
    assert saved >= 2
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    computed.clear()
    stats = store.update(wanted, compute, batch_size=2)
    assert stats.computed == 12 - saved and computed == list(range(saved, 12))
    reference = ShardStore(tmp_path / "reference", SCHEMA, {"stage": "test"}, shard_rows=4)
    reference.update(wanted, noise, batch_size=2)
    assert read_table(small_disk / "table").equals(read_table(tmp_path / "reference"))


@pytest.fixture
def fault(monkeypatch):
    """Set MIRAGE_FAULT for this test, with fresh hit counts."""
    faults.reset()

    def set_fault(value: str) -> None:
        faults.reset()
        monkeypatch.setenv("MIRAGE_FAULT", value)

    yield set_fault
    faults.reset()


def small_generate(root: Path, **extra):
    p = params_mod.load(ROOT / "params.yaml", flatten({**TINY, "generate": {"per_prompt": 4, "steps": 2, "batch_size": 4}})
                        | {"generate.model": str(ROOT / "models" / "generator"), "runner.retry_delay": 0.05, **extra})
    from flows.generate import generate_flow

    return generate_flow(p.generate, str(root / "images"), p.runner)


def test_flaky_batch_is_retried_and_the_run_succeeds(tmp_path, fault):
    reference = small_generate(tmp_path / "reference")
    fault("compute@2:raise")  # the second batch fails once
    counts = small_generate(tmp_path / "flaky")
    assert counts["computed"] == counts["items"] == 12
    assert read_table(tmp_path / "flaky" / "images").equals(read_table(tmp_path / "reference" / "images"))
    assert reference["computed"] == 12


@pytest.mark.slow
def test_flaky_batch_on_dask_is_retried_by_prefect(tmp_path, fault):
    fault("compute@1:raise")  # every worker's first batch fails once
    counts = small_generate(tmp_path / "dask", **{"runner.kind": "dask"})
    assert counts["computed"] == 12


def test_batch_failing_every_retry_stops_the_stage_naming_its_items(tmp_path, fault):
    fault("compute@2+:raise")  # from the second batch on, every attempt fails
    with pytest.raises(faults.InjectedFault) as err:
        small_generate(tmp_path / "broken", **{"runner.retries": 1})
    assert "hit 3" in str(err.value)  # the batch and its one retry
    assert "(4 in the batch) of" in " ".join(err.value.__notes__)
    assert len(read_table_keys(tmp_path / "broken" / "images")) == 4  # the first batch is kept for the rerun


def read_table_keys(root: Path) -> set[str]:
    import pyarrow.parquet as pq

    return {k for p in (root / ".work").glob("batch-*.parquet") for k in pq.read_table(p).column("key").to_pylist()}


def test_out_of_memory_names_the_batch_size_key(tmp_path, fault):
    fault("compute@2:oom")
    with pytest.raises(Exception, match=r"out of memory computing a batch \(generate\.batch_size=4\): try "
                                        r"`-S generate\.batch_size=2`"):
        small_generate(tmp_path / "oom")
    assert len(read_table_keys(tmp_path / "oom" / "images")) == 4  # not retried; finished batches kept


@pytest.mark.slow
def test_permanent_failure_ends_the_run_with_stage_items_and_cause(project, fault, capsys):
    fault("compute@1+:raise")
    code = cli.main(["--root", str(project), "run", "-S", "generate.per_prompt=9", "-S", "runner.retry_delay=0.05"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(line for line in err.splitlines() if line.startswith("mirage: stage"))
    assert "stage generate failed: InjectedFault: injected fault at compute" in line
    assert "in the batch) of data/generated" in line


def test_a_bar_the_garbage_collector_closes_calls_no_client(monkeypatch):
    """A bar left open is closed by the garbage collector, which can run inside
    the Prefect client's own request (holding its connection pool's lock): a
    report from there hung the test run. close() still reports."""
    from mirage.run import stage

    sent = []
    monkeypatch.setattr(stage._Bar, "_report", lambda self: sent.append(self.n))
    for finish in ("__del__", "close"):
        bar = stage.progress(4, finish)
        bar._artifact = "an artifact"  # as inside a flow run
        bar.update(1)  # within ARTIFACT_EVERY of its start: no report yet
        getattr(bar, finish)()
    assert sent == [1]  # close's report only
