"""Sharded Parquet tables with a manifest: item keys, resume, atomic writes.

One mechanism for every stage.  A stage names the items it wants (ordered
keys, each with whatever spec computes it); the store reuses rows whose key
it already has, computes the missing ones in batches, and writes a canonical
layout (shards of `shard_rows` rows in wanted order, named by a hash of their
keys) so the result is byte-identical to a from-scratch run.

Crash safety: every file is written to a temp name and renamed.  Computed
batches land in `.work/` first, so a killed run resumes without recomputing
them; the manifest is replaced last, and files it does not name are deleted
only after it is in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
WORK = ".work"


def item_key(*parts: Any) -> str:
    """A stable hash of what determines an item (inputs, params, model, version)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_parquet(path: Path, table: pa.Table) -> None:
    """Atomic Parquet write with fixed settings, so equal tables give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=4096)
    os.replace(tmp, path)


@dataclass
class UpdateStats:
    wanted: int
    reused: int
    computed: int
    dropped: int


class ShardStore:
    """A directory of Parquet shards plus `manifest.json`."""

    def __init__(self, root: str | Path, schema: pa.Schema, metadata: dict[str, str], shard_rows: int):
        self.root = Path(root)
        self.metadata = {k: str(v) for k, v in sorted(metadata.items())}
        self.schema = schema.with_metadata(self.metadata)
        self.shard_rows = shard_rows

    # -- reading ---------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {"shards": []}

    def _index(self) -> dict[str, tuple[Path, int]]:
        """key -> (file, row) over the current shards and finished work batches."""
        index: dict[str, tuple[Path, int]] = {}
        files = [self.root / s["file"] for s in self.manifest()["shards"]]
        work = self.root / WORK
        if work.exists():
            files += sorted(work.glob("batch-*.parquet"))
        for f in files:
            if not f.exists():
                continue
            if f.parent.name == WORK and pq.read_schema(f).remove_metadata() != self.schema.remove_metadata():
                continue  # a batch from an older schema: recompute it
            for row, key in enumerate(pq.read_table(f, columns=["key"]).column("key").to_pylist()):
                index.setdefault(key, (f, row))
        return index

    # -- writing ---------------------------------------------------------------
    def update(
        self,
        wanted: Sequence[tuple[str, Any]],
        compute: Callable[[list[Any]], pa.Table],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> UpdateStats:
        """Make the table hold exactly `wanted` (key, spec) items, in order.

        `compute(specs)` returns a table of `self.schema` with one row per spec,
        in order, its `key` column set to the specs' keys.
        """
        keys = [k for k, _ in wanted]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"duplicate item key {dup} in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        index = self._index()
        missing = [(k, s) for k, s in wanted if k not in index]
        work = self.root / WORK
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            table = compute([s for _, s in chunk])
            got = table.column("key").to_pylist()
            if got != [k for k, _ in chunk]:
                raise RuntimeError(f"compute returned keys out of order for {self.root}")
            path = work / f"batch-{item_key(got)}.parquet"
            write_parquet(path, table.cast(self.schema))
            for row, key in enumerate(got):
                index[key] = (path, row)
            if progress:
                progress(len(chunk))
        reused = len(wanted) - len(missing)
        old_keys = set(self._manifest_keys())
        self._finalize(keys, index)
        return UpdateStats(len(wanted), reused, len(missing), len(old_keys - set(keys)))

    def _manifest_keys(self) -> Iterator[str]:
        for shard in self.manifest()["shards"]:
            yield from shard["keys"]

    def _finalize(self, keys: list[str], index: dict[str, tuple[Path, int]]) -> None:
        shards = []
        cache: dict[Path, pa.Table] = {}
        for start in range(0, max(len(keys), 1), self.shard_rows):
            part = keys[start : start + self.shard_rows]
            name = f"part-{start // self.shard_rows:05d}-{item_key(part, self.metadata)[:12]}.parquet"
            path = self.root / name
            if not path.exists():
                pieces = []
                for key in part:
                    src, row = index[key]
                    if src not in cache:
                        cache.clear()  # keep one source table in memory at a time
                        cache[src] = pq.read_table(src)
                    pieces.append(cache[src].slice(row, 1))
                table = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
                write_parquet(path, table.cast(self.schema).combine_chunks())
            shards.append({"file": name, "rows": len(part), "keys": part})
        atomic_write_json(self.root / MANIFEST, {"shards": shards})
        keep = {s["file"] for s in shards} | {MANIFEST}
        for entry in self.root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def read_table(root: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole table named by `root/manifest.json`, in manifest order."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: run the stage that writes it first")
    shards = json.loads(path.read_text())["shards"]
    tables = [pq.read_table(root / s["file"], columns=columns) for s in shards if s["rows"]]
    if not tables:
        return pq.read_table(root / shards[0]["file"], columns=columns)
    return pa.concat_tables(tables)


def table_metadata(root: str | Path) -> dict[str, str]:
    """The key-value metadata (provenance) of the table at `root`."""
    root = Path(root)
    first = json.loads((root / MANIFEST).read_text())["shards"][0]["file"]
    meta = pq.read_schema(root / first).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Write a directory (a saved model) under a temp name; swap it in on success."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
