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

import bisect
import errno
import hashlib
import io
import json
import os
import queue
import re
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

# Named places where a run may be cut short (a kill between two writes).  The
# store only calls the hooks: mirage/run/faults.py registers the test
# harness's fault injection (MIRAGE_FAULT) when a stage command starts, so
# this module, a dep of every stage, never imports runtime code.
INTERRUPTION_HOOKS: list[Callable[[str], None]] = []


def add_interruption_hook(hook: Callable[[str], None]) -> None:
    """Register `hook(point_name)` to act at every interruption point, once."""
    if hook not in INTERRUPTION_HOOKS:
        INTERRUPTION_HOOKS.append(hook)


def interruption_point(name: str) -> None:
    """Let the registered hooks act at the named point (no hook: nothing happens)."""
    for hook in INTERRUPTION_HOOKS:
        hook(name)


def item_key(*parts: Any) -> str:
    """A stable hash of what determines an item (inputs, params, model, version)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """Where `path` is written before it is renamed into place: a hidden
    sibling named by this process, so a leftover of a killed process is
    recognised (and removed) by the next one: `sweep_temps`."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


_TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: from a write this process gave up on
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temps(folder: Path, prefix: str = "") -> int:
    """Remove the temp files and folders (`temp_name`) that processes no
    longer alive left in `folder` (killed mid-write: SIGKILL, OOM, a lost
    machine); those of live processes are theirs.  Returns how many went."""
    if not folder.is_dir():
        return 0
    gone = 0
    for entry in folder.iterdir():
        found = _TEMP.match(entry.name)
        if found and entry.name.startswith(f".{prefix}") and not _alive(int(found.group(2))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            gone += 1
    return gone


class DiskFull(OSError):
    """No space left where a stage writes: nothing half-written stays behind."""


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """A temp name to write `path` under; renamed into place when the block
    ends, removed if it fails.  A full disk raises DiskFull naming the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        interruption_point("write")
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            usage = shutil.disk_usage(path.parent)
            raise DiskFull(errno.ENOSPC, f"no space left on the device writing {path} ({usage.free >> 20} MB free "
                           f"of {usage.total >> 20} MB): free some space and run again; finished batches are "
                           f"kept and a rerun resumes from them") from err
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes, fault: str = "") -> None:
    """Write to a temp name, then rename: readers see the old file or the new one.
    `fault`: the interruption point between the two (see `interruption_point`)."""
    with writing(path) as tmp:
        tmp.write_bytes(data)
        if fault:
            interruption_point(fault)


def atomic_write_json(path: Path, obj: Any, fault: str = "") -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), fault)


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
    rows = rows_per_group(table.nbytes / max(table.num_rows, 1))
    with writing(path) as tmp:
        pq.write_table(table, tmp, row_group_size=rows, **(options or parquet_options(table.schema)))


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
class Partial:
    """A batch's rows for the items that worked (in batch order) and why the
    others failed: key -> (item id, reason).  Failed items are left out of
    the table and reported in its errors file; they are not cached, so the
    next run tries them again."""

    table: pa.Table
    errors: dict[str, tuple[str, str]]


class TooManyErrors(RuntimeError):
    """More items failed than `errors.max_fraction` allows."""


@dataclass
class UpdateStats:
    wanted: int
    reused: int  # from the output, unfinished work, or the pool
    computed: int
    dropped: int
    restored: int = 0  # of `reused`: rows brought back from the pool
    failed: dict[str, tuple[str, str]] = None  # key -> (item id, reason), in wanted order

    def __post_init__(self):
        self.failed = self.failed or {}


ERRORS = "errors.parquet"  # a table's failed items: key, id, stage, reason
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])


class ShardStore:
    """A directory of Parquet shards plus `manifest.json`."""

    def __init__(self, root: str | Path, schema: pa.Schema, metadata: dict[str, str], shard_rows: int,
                 pool: str | Path | None = None, row_bytes: int | None = None, sidecars: tuple[str, ...] = ()):
        """`row_bytes`: an estimate of a row's size, which sizes the row groups
        (about SHARD_GROUP_BYTES, what a reader or the finaliser holds at once);
        without it, groups of 4096 rows.  `sidecars`: files the stage keeps
        beside the shards (every other file there is removed on update)."""
        self.root = Path(root)
        self.sidecars = set(sidecars)
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
        max_error_fraction: float = 1.0,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> UpdateStats:
        """Make the table hold exactly `wanted` (key, spec) items, in order.

        `compute(x)` returns a table of `self.schema` with one row per spec of
        the batch, in order, its `key` column set to the specs' keys; `x` is
        the batch's specs, or `prepare(specs)` when `prepare` is given (run
        in a background thread, `prefetch` batches ahead).  Or `run(batches)`
        yields (index, table) for every batch of specs, in any order (a runner,
        mirage/run/runner.py): the output is the same whatever order they come in.
        A batch's result may be a `Partial`: its failed items are left out of
        the table and listed in `errors.parquet` beside the shards; past
        `max_error_fraction` of the wanted items, TooManyErrors is raised
        after the table is written (what worked is kept).  `on_plan(kept,
        to_compute)` hears, before any batch, how many items are already made
        (by earlier or killed runs) and how many are left; `progress(n)`, as
        each batch of n is saved.
        """
        keys = [k for k, _ in wanted]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"duplicate item key {dup} in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / WORK
        for folder in (self.root, work, self._pool_dir(self.schema) if self.pool else None):
            if folder:
                sweep_temps(folder)  # half-written files of a killed run: never read, now removed
        index = self._index()
        missing = [(k, s) for k, s in wanted if k not in index]
        failed: dict[str, tuple[str, str]] = {}
        pooled = sum(1 for k, _ in wanted if k in index and self._pooled(index[k][0]))
        if on_plan:  # what earlier runs left (the table, a killed run's work area, the pool), what is left to do
            on_plan(len(wanted) - len(missing), len(missing))
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
            if isinstance(table, Partial):
                failed.update(table.errors)
                table = table.table
            got = table.column("key").to_pylist()
            if got != [k for k, _ in chunk if k not in failed]:
                raise RuntimeError(f"compute returned keys out of order for {self.root}")
            interruption_point("batch")  # computed, not saved: the batch is redone
            if got:
                path = work / f"batch-{item_key(got)}.parquet"
                write_parquet(path, table.cast(self.schema), self.options)
                for row, key in enumerate(got):
                    index[key] = (path, row)
            interruption_point("batch-saved")
            if progress:
                progress(len(chunk))
        reused = len(wanted) - len(missing)
        old_keys = set(self._manifest_keys())
        dropped = old_keys - set(keys)
        if self.pool and dropped:
            self._keep(sorted(dropped), index)
        failed = {k: failed[k] for k in keys if k in failed}  # in wanted order
        self._finalize([k for k in keys if k not in failed], index, failed)
        stats = UpdateStats(len(wanted), reused, len(missing) - len(failed), len(dropped), pooled, failed)
        if len(failed) > max_error_fraction * len(wanted):
            raise TooManyErrors(self.error_summary(stats, max_error_fraction))
        return stats

    def error_summary(self, stats: UpdateStats, max_fraction: float) -> str:
        """Failed items in words: how many of how many, the limit, the first reasons."""
        shown = [f"{item}: {reason}" for item, reason in list(stats.failed.values())[:5]]
        more = f"; ... ({len(stats.failed) - 5} more)" if len(stats.failed) > 5 else ""
        return (f"{len(stats.failed)} of {stats.wanted} items failed in {self.root} (more than errors.max_fraction="
                f"{max_fraction} allows; all in {self.root / ERRORS}, retried by the next run): "
                + "; ".join(shown) + more)

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
        """The rows of `keys`, in order, as tables of up to `group_rows` rows.
        Sources are read a row group at a time (the last few kept), never a
        whole file per switch between sources: an incremental run that
        interleaves new rows with old ones reads each old row group once."""
        groups = RowGroups()
        pieces: list[pa.Table] = []
        run: list = []  # [row group table, first row, rows]: consecutive rows of one group
        count = 0
        for key in keys:
            table, offset = groups.locate(*index[key])
            if run and run[0] is table and run[1] + run[2] == offset:
                run[2] += 1
            else:
                if run:
                    pieces.append(_copy_rows(*run))
                run = [table, offset, 1]
            count += 1
            if count == self.group_rows:
                pieces.append(_copy_rows(*run))
                yield pa.concat_tables(pieces).cast(schema).combine_chunks()
                pieces, run, count = [], [], 0
        if run:
            pieces.append(_copy_rows(*run))
        if pieces:
            yield pa.concat_tables(pieces).cast(schema).combine_chunks()

    def _write(self, path: Path, keys: list[str], index: dict[str, tuple[Path, int]],
               schema: pa.Schema | None = None) -> None:
        """One shard, written a row group at a time (fixed group size, so the
        bytes depend on the rows only, not on where they came from).  `schema`:
        the rows' own (pool rows of an earlier encoder); default the table's."""
        schema = schema or self.schema
        options = self.options if schema is self.schema else parquet_options(schema)
        with writing(path) as tmp, pq.ParquetWriter(tmp, schema, **options) as writer:
            for group in self._rows(keys, index, schema):
                writer.write_table(group, row_group_size=self.group_rows)
            if not keys:
                writer.write_table(schema.empty_table())

    def _finalize(self, keys: list[str], index: dict[str, tuple[Path, int]],
                  failed: dict[str, tuple[str, str]] | None = None) -> None:
        shards = []
        for start in range(0, max(len(keys), 1), self.shard_rows):
            part = keys[start : start + self.shard_rows]
            name = f"part-{start // self.shard_rows:05d}-{item_key(part, self.metadata)[:12]}.parquet"
            path = self.root / name
            if not path.exists():
                self._write(path, part, index)
            shards.append({"file": name, "rows": len(part), "keys": part})
        if failed:  # what failed, beside the shards (a reader of the manifest never sees it)
            stage = self.metadata.get("stage", "")
            rows = [{"key": k, "id": item, "stage": stage, "reason": why} for k, (item, why) in failed.items()]
            write_parquet(self.root / ERRORS, pa.Table.from_pylist(rows, schema=ERROR_SCHEMA))
        interruption_point("shards-written")
        atomic_write_json(self.root / MANIFEST, {"shards": shards}, fault="manifest-replace")
        keep = {s["file"] for s in shards} | {MANIFEST} | ({ERRORS} if failed else set()) | self.sidecars
        for entry in self.root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _copy_rows(table: pa.Table, first: int, rows: int) -> pa.Table:
    """Rows of a row group, copied: the group itself can then be let go."""
    return table.take(pa.array(range(first, first + rows), pa.int64()))


class RowGroups:
    """Rows of Parquet files by (file, row), read one row group at a time,
    the last `keep` groups kept in memory."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.starts: dict[Path, list[int]] = {}  # each file's first row of every row group, and its row count
        self.cached: dict[tuple[Path, int], pa.Table] = {}  # in use order, oldest first

    def locate(self, path: Path, row: int) -> tuple[pa.Table, int]:
        """The row group holding `row` of `path`, and the row's offset in it."""
        if path not in self.starts:
            meta = pq.ParquetFile(path).metadata
            starts = [0]
            for g in range(meta.num_row_groups):
                starts.append(starts[-1] + meta.row_group(g).num_rows)
            self.starts[path] = starts
        starts = self.starts[path]
        group = bisect.bisect_right(starts, row) - 1
        table = self.cached.pop((path, group), None)
        if table is None:
            table = pq.ParquetFile(path).read_row_group(group)
            if len(self.cached) >= self.keep:
                self.cached.pop(next(iter(self.cached)))
        self.cached[(path, group)] = table
        return table, row - starts[group]


def schema_digest(schema: pa.Schema) -> str:
    """A short hash of a schema's columns and types as Parquet stores them
    (metadata left out; a list's item field reads back named `element`)."""
    buf = io.BytesIO()
    pq.write_table(schema.remove_metadata().empty_table(), buf)
    stored = pq.read_schema(io.BytesIO(buf.getvalue())).remove_metadata()
    return hashlib.sha256(stored.to_string().encode()).hexdigest()[:12]


def read_errors(root: str | Path) -> list[dict[str, str]]:
    """The failed items of the table at `root` (key, id, stage, reason)."""
    path = Path(root) / ERRORS
    return pq.read_table(path).to_pylist() if path.exists() else []


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
    sweep_temps(out.parent, out.name)  # what a killed run left
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temp_name(out, "old")
    if out.exists():
        out.rename(old)
    interruption_point("model-swap")  # killed here, `out` is missing: its stage is stale and reruns
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
