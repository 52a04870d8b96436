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


def interleaved(n, every):
    """n old items with a new one after every `every`-th: how raising
    generate.per_prompt grows a table (new items among the old)."""
    out = []
    for i in range(n):
        out.append((f"k{i}", i))
        if i % every == every - 1:
            out.append((f"k{1000 + i}", 1000 + i))
    return out


def test_items_inserted_among_old_ones_rewrite_only_new_shards_and_read_back_in_order(tmp_path):
    """+10% interleaved over 40 items: the 10 full old shards stay byte for
    byte, the new items land in new shards, and every reader sees the rows in
    the wanted order, as a from-scratch table holds them."""
    from mirage.data.store import OrderedReader, iter_rows, read_manifest

    grown, scratch = tmp_path / "grown", tmp_path / "scratch"
    store(grown).update(wanted(40), Counter(), batch_size=8)
    before = files(grown)
    more = Counter()
    stats = store(grown).update(interleaved(40, 10), more, batch_size=8)
    assert more.computed == [1009, 1019, 1029, 1039] and stats.reused == 40
    after = files(grown)
    shards = [name for name in before if name.startswith("part-")]
    assert len(shards) == 10 and all(after[name] == before[name] for name in shards)  # old shards untouched
    new = [name for name in after if name not in before]
    assert sorted(n.split("-")[0] for n in new) == ["order", "part"]  # one shard of the 4 new rows, and the order
    store(scratch).update(interleaved(40, 10), Counter(), batch_size=8)
    want = [k for k, _ in interleaved(40, 10)]
    for root in (grown, scratch):
        assert read_table(root).column("key").to_pylist() == want
        assert [r["key"] for r in iter_rows(root, ["key", "value"], batch_rows=3)] == want
    assert read_table(grown).equals(read_table(scratch))
    assert [r["value"] for r in OrderedReader(grown, ["value"]).take(want[9:13])] == [81, 1009 * 1009, 100, 121]
    assert read_manifest(grown)["rows"] == 44 and read_manifest(scratch)["order"] is None


def test_a_no_op_reads_no_shard_and_writes_nothing(tmp_path, monkeypatch):
    """Same keys again: answered from the manifest (a digest of the keys and a
    stat per shard); not one shard is opened, no file is rewritten."""
    import mirage.data.store as store_module

    store(tmp_path).update(interleaved(12, 3), Counter(), batch_size=4)
    store(tmp_path).update(interleaved(16, 3), Counter(), batch_size=4)  # a table with an order file
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    monkeypatch.setattr(store_module, "_key_index", lambda *a: pytest.fail("a no-op read the shards' keys"))
    again = Counter()
    stats = store(tmp_path).update(interleaved(16, 3), again, batch_size=4)
    assert again.computed == [] and (stats.reused, stats.computed, stats.dropped) == (21, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps


def test_dropping_items_rewrites_only_the_shards_that_lose_rows(tmp_path):
    store(tmp_path).update(wanted(16), Counter(), batch_size=8)
    before = files(tmp_path)
    stats = store(tmp_path).update([w for w in wanted(16) if w[1] not in (5, 6)], Counter(), batch_size=8)
    assert stats.dropped == 2 and stats.computed == 0
    after = files(tmp_path)
    kept = [name for name in before if name.startswith("part-") and name in after]
    assert len(kept) == 3 and all(after[name] == before[name] for name in kept)
    assert read_table(tmp_path).column("value").to_pylist() == [i * i for i in range(16) if i not in (5, 6)]


def test_a_table_of_the_old_layout_is_read_and_updated_without_recomputing(tmp_path):
    """A manifest of the first layout (every key listed) still reads, and the
    first update computes nothing, rewrites no shard (its full shards are
    linked under this layout's names) and leaves what a scratch run writes."""
    import json

    from mirage.data.store import read_manifest

    store(tmp_path).update(wanted(10), Counter(), batch_size=4)
    manifest = read_manifest(tmp_path)
    keys = read_table(tmp_path).column("key").to_pylist()
    for n, shard in enumerate(manifest["shards"]):  # the first layout's names
        old_name = f"part-{n:05d}-{shard['file'][5:17]}.parquet"
        (tmp_path / shard["file"]).rename(tmp_path / old_name)
        shard["file"] = old_name
    legacy, at = [], 0
    for shard in manifest["shards"]:
        legacy.append({"file": shard["file"], "rows": shard["rows"], "keys": keys[at : at + shard["rows"]]})
        at += shard["rows"]
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": legacy}))
    assert read_table(tmp_path).column("key").to_pylist() == keys
    before = files(tmp_path)
    again = Counter()
    stats = store(tmp_path).update(wanted(10), again, batch_size=4)
    assert again.computed == [] and stats.reused == 10
    assert sorted(b for n, b in files(tmp_path).items() if n.startswith("part-")) == \
        sorted(b for n, b in before.items() if n.startswith("part-"))  # not one shard rewritten
    store(tmp_path / "scratch").update(wanted(10), Counter(), batch_size=4)
    assert files(tmp_path / "scratch") == {n: b for n, b in files(tmp_path).items() if not n.startswith("scratch/")}


def test_the_scale_benchmark_grows_a_table_by_rewriting_about_what_it_adds(tmp_path):
    """benchmarks/store_scale.py at 20k items (20 shards of 1024), the current
    store: +1% appended or interleaved writes under 5% of the table's bytes,
    a no-op writes nothing, every case computes only what is new."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store_scale.py"), "--sizes", "20000",
                           "--variants", "now (list)", "now (Wanted)", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| 20,000 | now (Wanted) |" in done.stdout
    for variant, cases in json.loads(out.read_text())["20000"].items():
        assert cases["scratch"]["computed"] == 20000 and cases["no-op"]["computed"] == 0, variant
        assert cases["no-op"]["written"] == 0, variant
        for grown in ("+1% at the end", "+1% interleaved"):
            assert cases[grown]["computed"] == 200, (variant, grown)
            assert 0 < cases[grown]["written"] <= 0.05 * cases[grown]["table_bytes"], (variant, grown, cases[grown])
