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

Streaming: `prepare` (reading and decoding a batch's inputs) runs in a
background thread up to `prefetch` batches ahead of `compute` (the model), and
memory holds a few batches, not the table.

Pool: rows that stop being wanted can be kept in a pool directory outside the
output (e.g. the features of the previous encoder), so switching back restores
them instead of recomputing; the output itself stays identical to a
from-scratch run.  The pool keeps one subdirectory per table schema (an
encoder of another width, another patch backbone), so rows of any schema can
be kept and found again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import threading
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


ROW_GROUP_BYTES = 64 << 20  # readers stream a row group at a time
SHARD_GROUP_BYTES = 16 << 20  # a shard store's row groups: what finalising holds at once


def rows_per_group(row_bytes: float, budget: int = ROW_GROUP_BYTES) -> int:
    """Rows in a row group of about `budget` bytes (1 to 4096)."""
    return max(1, min(4096, int(budget // max(row_bytes, 1))))


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Fixed write settings (equal tables give equal bytes): zstd, Parquet's
    default dictionary encoding, except float16 vectors (embeddings, patch
    features), which are written byte-stream-split: ~1.7x faster and smaller
    than a dictionary attempt on values that never repeat."""
    floats = [f"{f.name}.list.element" for f in schema
              if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type)]
    if not floats:
        return {"compression": "zstd"}
    buf = io.BytesIO()
    pq.write_table(schema.empty_table(), buf)
    leaves = pq.ParquetFile(io.BytesIO(buf.getvalue())).schema
    others = [leaves.column(i).path for i in range(len(leaves)) if leaves.column(i).path not in floats]
    return {"compression": "zstd", "use_dictionary": others,
            "column_encoding": {path: "BYTE_STREAM_SPLIT" for path in floats}}


def write_parquet(path: Path, table: pa.Table, options: dict[str, Any] | None = None) -> None:
    """Atomic Parquet write with fixed settings, so equal tables give equal bytes.
    Row groups hold up to 4096 rows and about 64 MB, so big rows (real images,
    patch features) still stream.  `options`: parquet_options of the schema,
    when the caller already has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows = rows_per_group(table.nbytes / max(table.num_rows, 1))
    pq.write_table(table, tmp, row_group_size=rows, **(options or parquet_options(table.schema)))
    os.replace(tmp, path)


class _Failed:
    def __init__(self, err: BaseException):
        self.err = err


def prepared_ahead(chunks: Sequence[Any], prepare: Callable[[Any], Any], depth: int) -> Iterator[tuple[Any, Any]]:
    """Yield (chunk, prepare(chunk)) in order, with prepare running in one
    background thread up to `depth` chunks ahead (depth 0: inline)."""
    if depth <= 0:
        for chunk in chunks:
            yield chunk, prepare(chunk)
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for chunk in chunks:
                if not put((chunk, prepare(chunk))):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(_Failed(err))

    thread = threading.Thread(target=work, name="mirage-prepare", daemon=True)
    thread.start()
    try:
        for _ in range(len(chunks)):
            item = q.get()
            if isinstance(item, _Failed):
                raise item.err
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


@dataclass
class UpdateStats:
    wanted: int
    reused: int  # from the output, unfinished work, or the pool
    computed: int
    dropped: int
    restored: int = 0  # of `reused`: rows brought back from the pool


class ShardStore:
    """A directory of Parquet shards plus `manifest.json`."""

    def __init__(self, root: str | Path, schema: pa.Schema, metadata: dict[str, str], shard_rows: int,
                 pool: str | Path | None = None, row_bytes: int | None = None):
        """`row_bytes`: an estimate of a row's size, which sizes the row groups
        (about SHARD_GROUP_BYTES, what a reader or the finaliser holds at once);
        without it, groups of 4096 rows."""
        self.root = Path(root)
        self.group_rows = rows_per_group(row_bytes, SHARD_GROUP_BYTES) if row_bytes else 4096
        self.pool = Path(pool) if pool else None
        self.metadata = {k: str(v) for k, v in sorted(metadata.items())}
        self.schema = schema.with_metadata(self.metadata)
        self.options = parquet_options(self.schema)
        self.shard_rows = shard_rows

    # -- reading ---------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {"shards": []}

    def _pool_dir(self, schema: pa.Schema) -> Path:
        """The pool's subdirectory for rows of `schema` (metadata aside)."""
        return self.pool / f"schema-{schema_digest(schema)}"

    def _index(self) -> dict[str, tuple[Path, int]]:
        """key -> (file, row) over the current shards, finished work batches and
        the pool's rows of this table's schema."""
        index: dict[str, tuple[Path, int]] = {}
        files = [self.root / s["file"] for s in self.manifest()["shards"]]
        work = self.root / WORK
        if work.exists():
            files += sorted(work.glob("batch-*.parquet"))
        if self.pool and self._pool_dir(self.schema).exists():
            files += sorted(self._pool_dir(self.schema).glob("kept-*.parquet"))
        for f in files:
            if not f.exists():
                continue
            if f.parent != self.root and pq.read_schema(f).remove_metadata() != self.schema.remove_metadata():
                continue  # work rows of another schema (an older version, another encoder)
            for row, key in enumerate(pq.read_table(f, columns=["key"]).column("key").to_pylist()):
                index.setdefault(key, (f, row))
        return index

    # -- writing ---------------------------------------------------------------
    def update(
        self,
        wanted: Sequence[tuple[str, Any]],
        compute: Callable[[list[Any]], pa.Table] | None,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        prepare: Callable[[list[Any]], Any] | None = None,
        prefetch: int = 2,
        run: Callable[[list[list[Any]]], Iterator[tuple[int, pa.Table]]] | None = None,
    ) -> UpdateStats:
        """Make the table hold exactly `wanted` (key, spec) items, in order.

        `compute(x)` returns a table of `self.schema` with one row per spec of
        the batch, in order, its `key` column set to the specs' keys; `x` is
        the batch's specs, or `prepare(specs)` when `prepare` is given (run
        in a background thread, `prefetch` batches ahead).  Or `run(batches)`
        yields (index, table) for every batch of specs, in any order (a runner,
        mirage/runner.py): the output is the same whatever order they come in.
        """
        keys = [k for k, _ in wanted]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"duplicate item key {dup} in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        index = self._index()
        missing = [(k, s) for k, s in wanted if k not in index]
        work = self.root / WORK
        pooled = sum(1 for k, _ in wanted if k in index and self._pooled(index[k][0]))
        chunks = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        if run is None:
            make = prepare or (lambda specs: specs)
            ahead = prefetch if prepare else 0

            def run(batches):
                for i, (_, x) in enumerate(prepared_ahead(batches, make, ahead)):
                    try:
                        yield i, compute(x)
                    except Exception as err:
                        err.batch_index = i
                        raise
        results = run([[s for _, s in chunk] for chunk in chunks])
        while True:
            try:
                i, table = next(results)
            except StopIteration:
                break
            except Exception as err:  # name the items: the run's failure message shows it
                ids = [k[:16] for k, _ in chunks[getattr(err, "batch_index", 0)]] if chunks else []
                err.add_note(f"items {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} ({len(ids)} in the batch) of {self.root}")
                raise
            chunk = chunks[i]
            got = table.column("key").to_pylist()
            if got != [k for k, _ in chunk]:
                raise RuntimeError(f"compute returned keys out of order for {self.root}")
            path = work / f"batch-{item_key(got)}.parquet"
            write_parquet(path, table.cast(self.schema), self.options)
            for row, key in enumerate(got):
                index[key] = (path, row)
            if progress:
                progress(len(chunk))
        reused = len(wanted) - len(missing)
        old_keys = set(self._manifest_keys())
        dropped = old_keys - set(keys)
        if self.pool and dropped:
            self._keep(sorted(dropped), index)
        self._finalize(keys, index)
        return UpdateStats(len(wanted), reused, len(missing), len(dropped), pooled)

    def _pooled(self, path: Path) -> bool:
        return bool(self.pool) and path.parent.parent == self.pool

    def _keep(self, dropped: list[str], index: dict[str, tuple[Path, int]]) -> None:
        """Copy no-longer-wanted rows (the old output's) into the pool before the
        output drops them, each under its own schema: rows of the previous
        encoder keep theirs."""
        by_schema: dict[str, tuple[pa.Schema, list[str]]] = {}
        schemas: dict[Path, pa.Schema] = {}
        for key in dropped:
            src = index[key][0]
            if src not in schemas:
                schemas[src] = pq.read_schema(src)
            by_schema.setdefault(schema_digest(schemas[src]), (schemas[src], []))[1].append(key)
        for digest, (schema, keys) in by_schema.items():
            name = f"kept-{item_key(keys, digest)[:16]}.parquet"
            self._write(self._pool_dir(schema) / name, keys, index, schema)

    def _manifest_keys(self) -> Iterator[str]:
        for shard in self.manifest()["shards"]:
            yield from shard["keys"]

    def _rows(self, keys: list[str], index: dict[str, tuple[Path, int]], schema: pa.Schema) -> Iterator[pa.Table]:
        """The rows of `keys`, in order, as tables of up to `group_rows` rows,
        holding one source file and one group in memory at a time."""
        pieces: list[pa.Table] = []
        cache: dict[Path, pa.Table] = {}
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

    def _write(self, path: Path, keys: list[str], index: dict[str, tuple[Path, int]],
               schema: pa.Schema | None = None) -> None:
        """One shard, written a row group at a time (fixed group size, so the
        bytes depend on the rows only, not on where they came from).  `schema`:
        the rows' own (pool rows of an earlier encoder); default the table's."""
        schema = schema or self.schema
        options = self.options if schema is self.schema else parquet_options(schema)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema, **options) as writer:
            for group in self._rows(keys, index, schema):
                writer.write_table(group, row_group_size=self.group_rows)
            if not keys:
                writer.write_table(schema.empty_table())
        os.replace(tmp, path)

    def _finalize(self, keys: list[str], index: dict[str, tuple[Path, int]]) -> None:
        shards = []
        for start in range(0, max(len(keys), 1), self.shard_rows):
            part = keys[start : start + self.shard_rows]
            name = f"part-{start // self.shard_rows:05d}-{item_key(part, self.metadata)[:12]}.parquet"
            path = self.root / name
            if not path.exists():
                self._write(path, part, index)
            shards.append({"file": name, "rows": len(part), "keys": part})
        atomic_write_json(self.root / MANIFEST, {"shards": shards})
        keep = {s["file"] for s in shards} | {MANIFEST}
        for entry in self.root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def schema_digest(schema: pa.Schema) -> str:
    """A short hash of a schema's columns and types as Parquet stores them
    (metadata left out; a list's item field reads back named `element`)."""
    buf = io.BytesIO()
    pq.write_table(schema.remove_metadata().empty_table(), buf)
    stored = pq.read_schema(io.BytesIO(buf.getvalue())).remove_metadata()
    return hashlib.sha256(stored.to_string().encode()).hexdigest()[:12]


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


def iter_rows(root: str | Path, columns: list[str], batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """The table's rows in manifest order, streamed a record batch at a time."""
    root = Path(root)
    for shard in json.loads((root / MANIFEST).read_text())["shards"]:
        if shard["rows"]:
            for batch in pq.ParquetFile(root / shard["file"]).iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()


class OrderedReader:
    """Rows of a table picked by key, for keys asked in table order (a
    subsequence of it): one streaming pass, whatever the table's size."""

    def __init__(self, root: str | Path, columns: list[str]):
        self.root = Path(root)
        self._rows = iter_rows(root, ["key", *columns])

    def take(self, keys: list[str]) -> list[dict[str, Any]]:
        out = []
        for key in keys:
            for row in self._rows:
                if row["key"] == key:
                    out.append(row)
                    break
            else:
                raise KeyError(f"{key} not found in {self.root} (or asked out of order)")
        return out


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
