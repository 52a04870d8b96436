"""Reading on resume: an incremental features update, old rows read per row group vs per whole file.

The features table of the toy data (data/features: embeddings + UNet patch
features, 64 KB a row) is grown to N rows (its rows again under new keys, in
shards of features.shard_rows), then updated to N + 10% items with the new
items interleaved among the old ones (one new after every ten old: new
prompts or images that sort between existing ones).  Finalising then copies
the old rows into new shards, switching between an old shard and the new
rows' work files every ten rows.

- whole-file: the reader before this change (mirage 0b08d80..8f462b5): the
  whole source file is read again at every switch of source file.
- row-group: ShardStore today: a source is read one row group at a time, the
  last few kept.

Each variant runs in a fresh process (peak RSS = that process's ru_maxrss);
both outputs must be byte-identical.

    .venv/bin/python benchmarks/incremental_read.py --rows 4000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mirage.data.store import ShardStore, item_key, read_table  # noqa: E402


class WholeFileStore(ShardStore):
    """ShardStore with the previous `_rows`: one source file cached, re-read whole on every switch."""

    def _rows(self, keys, index, schema):
        pieces, cache = [], {}
        for key in keys:
            src, row = index[key]
            if src not in cache:
                cache.clear()
                cache[src] = pq.read_table(src)
            pieces.append(cache[src].slice(row, 1))
            if len(pieces) == self.group_rows:
                yield pa.concat_tables(pieces).cast(schema).combine_chunks()
                pieces = []
        if pieces:
            yield pa.concat_tables(pieces).cast(schema).combine_chunks()


def rows_like(toy: pa.Table, keys: list[str]) -> pa.Table:
    """Rows of the toy table, cycled, under `keys`."""
    idx = pa.array([i % toy.num_rows for i in range(len(keys))], pa.int64())
    t = toy.take(idx)
    return t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys, pa.string()))


def open_store(cls, root: Path, toy: pa.Table, shard_rows: int) -> ShardStore:
    meta = {k.decode(): v.decode() for k, v in (toy.schema.metadata or {}).items()}
    row_bytes = toy.nbytes / toy.num_rows
    return cls(root, toy.schema.remove_metadata(), meta, shard_rows, row_bytes=int(row_bytes))


def child(variant: str, root: Path, features: Path, rows: int, shard_rows: int) -> None:
    """In a fresh process: the incremental update; prints seconds, peak RSS and the output digest."""
    toy = read_table(features)
    cls = WholeFileStore if variant == "whole-file" else ShardStore
    store = open_store(cls, root, toy, shard_rows)
    old = [item_key("old", i) for i in range(rows)]
    new = [item_key("new", i) for i in range(rows // 10)]
    wanted = []
    for i, key in enumerate(old):
        wanted.append(key)
        if i % 10 == 9 and i // 10 < len(new):
            wanted.append(new[i // 10])
    start = time.perf_counter()
    stats = store.update([(k, k) for k in wanted], lambda keys: rows_like(toy, keys), batch_size=128)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for shard in store.manifest()["shards"]:
        digest.update((root / shard["file"]).read_bytes())
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "computed": stats.computed, "reused": stats.reused, "digest": digest.hexdigest()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows before adding 10%")
    parser.add_argument("--shard-rows", type=int, default=1024, help="features.shard_rows (params.yaml's default)")
    parser.add_argument("--features", default=str(ROOT / "data" / "features"), help="the toy features table")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.features), args.rows, args.shard_rows)
    toy = read_table(args.features)
    print(f"toy features: {toy.num_rows} rows, {toy.nbytes / toy.num_rows / 1024:.0f} KB a row; "
          f"{args.rows} rows + {args.rows // 10} interleaved, shards of {args.shard_rows}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mirage-read-") as tmp:
        for variant in ("whole-file", "row-group"):
            root = Path(tmp) / variant
            base = open_store(ShardStore, root, toy, args.shard_rows)
            keys = [item_key("old", i) for i in range(args.rows)]
            base.update([(k, k) for k in keys], lambda ks: rows_like(toy, ks), batch_size=512)
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--shard-rows",
                                  str(args.shard_rows), "--features", args.features, "--child", variant, str(root)],
                                 check=True, capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
            r = results[variant]
            print(f"{variant:>10}: {r['seconds']:7.2f} s, peak RSS {r['rss_mb']:6.0f} MB "
                  f"({r['computed']} computed, {r['reused']} reused)")
    before, after = results["whole-file"], results["row-group"]
    print(f"row-group / whole-file: time {after['seconds'] / before['seconds']:.3f}, "
          f"peak RSS {after['rss_mb'] / before['rss_mb']:.3f}; outputs byte-identical: "
          f"{before['digest'] == after['digest']}")


if __name__ == "__main__":
    main()
