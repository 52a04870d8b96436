import pyarrow as pa
import pytest

from mirage.data.store import ShardStore, atomic_dir, read_table

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])


class Counter:
    def __init__(self, fail_after=None):
        self.computed = []
        self.fail_after = fail_after

    def __call__(self, specs):
        if self.fail_after is not None and len(self.computed) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.computed += specs
        return pa.table({"key": [f"k{s}" for s in specs], "value": [s * s for s in specs]}, schema=SCHEMA)


def wanted(n):
    return [(f"k{i}", i) for i in range(n)]


def files(root):
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def store(root):
    return ShardStore(root, SCHEMA, {"stage": "test"}, shard_rows=4)


def test_incremental_update_computes_only_new_items_and_matches_scratch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    first = Counter()
    store(a).update(wanted(10), first, batch_size=3)
    assert first.computed == list(range(10))
    more = Counter()
    stats = store(a).update(wanted(11), more, batch_size=3)
    assert more.computed == [10] and stats.reused == 10 and stats.computed == 1
    store(b).update(wanted(11), Counter(), batch_size=3)
    assert files(a) == files(b)
    assert read_table(a).column("value").to_pylist() == [i * i for i in range(11)]


def test_dropped_items_disappear(tmp_path):
    store(tmp_path).update(wanted(8), Counter(), batch_size=8)
    stats = store(tmp_path).update(wanted(5), Counter(), batch_size=8)
    assert stats.dropped == 3 and stats.computed == 0
    assert read_table(tmp_path).column("key").to_pylist() == [f"k{i}" for i in range(5)]


def test_killed_run_resumes_without_redoing_finished_batches(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        store(tmp_path / "a").update(wanted(9), Counter(fail_after=6), batch_size=3)
    resumed = Counter()
    store(tmp_path / "a").update(wanted(9), resumed, batch_size=3)
    assert resumed.computed == [6, 7, 8]
    store(tmp_path / "b").update(wanted(9), Counter(), batch_size=3)
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_duplicate_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="duplicate item key k1"):
        store(tmp_path).update([("k1", 1), ("k1", 1)], Counter(), batch_size=2)


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "w").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "w").write_text("two")
            raise RuntimeError("crash while saving")
    assert (out / "w").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


WIDE = pa.schema([("key", pa.string()), ("value", pa.list_(pa.float32(), 3))])


def wide(specs):
    return pa.table({"key": [f"w{s}" for s in specs], "value": [[float(s)] * 3 for s in specs]}, schema=WIDE)


def test_pool_keeps_rows_of_any_schema_and_switching_back_computes_nothing(tmp_path):
    """Switching to a table of another schema (an encoder of another width) and
    back: the first rows wait in the pool under their own schema."""
    out, pool = tmp_path / "out", tmp_path / "pool"
    narrow = lambda: ShardStore(out, SCHEMA, {"stage": "test"}, shard_rows=4, pool=pool)  # noqa: E731
    narrow().update(wanted(6), Counter(), batch_size=4)
    first = files(out)
    stats = ShardStore(out, WIDE, {"stage": "test"}, shard_rows=4, pool=pool).update(
        [(f"w{i}", i) for i in range(6)], wide, batch_size=4)
    assert stats.computed == 6 and stats.dropped == 6
    assert len(list(pool.glob("schema-*"))) == 1  # the narrow rows, under their schema
    back = Counter()
    stats = narrow().update(wanted(6), back, batch_size=4)
    assert back.computed == [] and stats.restored == 6
    assert files(out) == first  # byte-identical to the first run
    assert not (out / ".work").exists()
    again = ShardStore(out, WIDE, {"stage": "test"}, shard_rows=4, pool=pool).update(
        [(f"w{i}", i) for i in range(6)], wide, batch_size=4)
    assert again.computed == 0 and again.restored == 6  # and the wide rows wait there too
    assert len(list(pool.glob("schema-*"))) == 2


def test_a_resumed_update_says_what_it_kept_and_its_bar_starts_there(tmp_path, caplog):
    """Killed after two batches, the next update hears (on_plan) that 6 items
    are kept in the work area and 4 are left; the stage's bar starts at 6,
    says so, ends at 10, and the log says the run resumed."""
    import logging

    from mirage.run.stage import progress

    killed = Counter(fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        store(tmp_path).update(wanted(10), killed, batch_size=3)
    plans = []
    with caplog.at_level(logging.INFO, logger="mirage"), progress(10, "generate") as bar:
        stats = store(tmp_path).update(wanted(10), Counter(), batch_size=3, progress=bar.update,
                                       on_plan=lambda kept, todo: (plans.append((kept, todo)), bar.plan(kept, todo)))
        assert (bar.n, bar.initial, bar.desc) == (10, 6, "generate (6 kept, 4 to compute)")
    assert plans == [(6, 4)] and (stats.computed, stats.reused) == (4, 6)
    assert "generate: 6 of 10 items kept from earlier runs, 4 to compute" in caplog.text
    plans.clear()
    store(tmp_path).update(wanted(10), Counter(), batch_size=3, on_plan=lambda *a: plans.append(a))
    assert plans == [(10, 0)]  # nothing to do: all kept
