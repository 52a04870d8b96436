"""Sharded Parquet tables with a manifest: item keys, resume, atomic writes.

One mechanism for every stage.  A stage names the items it wants (ordered
keys, each with whatever spec computes it); the store reuses rows whose key
it already has, computes the missing ones in batches, and makes the table
hold exactly the wanted rows in the wanted order.

Layout (LAYOUT 2): shards of `shard_rows` rows named by a hash of their keys,
and a manifest that lists the shards (file, rows, first and last key) and a
digest of the table's keys, never every key, so a run with nothing to do is a
check of that digest.  Full shards whose rows are all still wanted are kept
as they are; every other row (new, or from a shard that lost rows or is not
full) goes into new shards in table order.  So a table made from scratch, or
one that only grew at its end, has the same bytes as ever; one that grew in
the middle keeps its old shards, adds about as many bytes as it grew, and
records its row order as runs of the shards' concatenation
(`order-*.parquet`).  Readers (`read_table`, `iter_rows`, `OrderedReader`)
give every table in its order; the shards hold each row exactly once.

Crash safety: every file is written to a temp name and renamed.  Computed
batches land in `.work/` first, so a killed run resumes without recomputing
them; the manifest is replaced last, and files it does not name are deleted
only after it is in place.

Streaming: `prepare` (reading and decoding a batch's inputs) runs in a
background thread up to `prefetch` batches ahead of `compute` (the model), and
memory holds a few batches of rows and the key index (Arrow and NumPy arrays,
about 60 bytes an item when the table changes), not the table.

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
from collections.abc import Sequence as SequenceABC
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


MANIFEST = "manifest.json"
LAYOUT = 2  # the manifest lists shards (file, rows, first and last key) and an order file, not every key
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
        return read_manifest(self.root)

    def _pool_dir(self, schema: pa.Schema) -> Path:
        """The pool's subdirectory for rows of `schema` (metadata aside)."""
        return self.pool / f"schema-{schema_digest(schema)}"

    def identity(self) -> str:
        """What a shard's bytes depend on besides its rows: columns, types, metadata."""
        return schema_identity(self.schema)

    def _sources(self, manifest: dict[str, Any]) -> tuple[list[Path], int, int]:
        """Files whose rows can be reused, and where each kind starts: the
        table's shards, then finished work batches, then the pool's rows of
        this schema (the first file holding a key is the one used)."""
        files = [self.root / s["file"] for s in manifest["shards"]]
        work = self.root / WORK
        done = sorted(work.glob("batch-*.parquet")) if work.exists() else []
        pooled = sorted(self._pool_dir(self.schema).glob("kept-*.parquet")) \
            if self.pool and self._pool_dir(self.schema).exists() else []
        columns = self.schema.remove_metadata()
        done = [f for f in done if pq.read_schema(f).remove_metadata() == columns]  # work of another schema
        return files + done + pooled, len(files), len(files) + len(done)

    def _unchanged(self, manifest: dict[str, Any], keys: pa.Array) -> bool:
        """The table already holds exactly `keys`, in order, written by a
        store like this one, with nothing left over: a no-op is this check
        (a digest of the keys, a stat per shard), never a pass over the rows."""
        return (manifest.get("layout") == LAYOUT and manifest.get("identity") == self.identity()
                and manifest.get("keys") == keys_digest(keys) and not (self.root / WORK).exists()
                and not (self.root / ERRORS).exists()
                and all((self.root / s["file"]).exists() for s in manifest["shards"])
                and (not manifest.get("order") or (self.root / manifest["order"]).exists()))

    # -- writing ---------------------------------------------------------------
    def update(
        self,
        wanted: Sequence[tuple[str, Any]] | Wanted,
        compute: Callable[[list[Any]], pa.Table] | None,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        prepare: Callable[[list[Any]], Any] | None = None,
        prefetch: int = 2,
        run: Callable[[Sequence[list[Any]]], Iterator[tuple[int, pa.Table]]] | None = None,
        max_error_fraction: float = 1.0,
        on_plan: Callable[[int, int], None] | None = None,
    ) -> UpdateStats:
        """Make the table hold exactly `wanted` items, in order: (key, spec)
        pairs, or a `Wanted` (keys as an Arrow array, specs made on demand).

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
        keys, spec_of = _wanted_items(wanted)
        n = len(keys)
        self.root.mkdir(parents=True, exist_ok=True)
        work = self.root / WORK
        for folder in (self.root, work, self._pool_dir(self.schema) if self.pool else None):
            if folder:
                sweep_temps(folder)  # half-written files of a killed run: never read, now removed
        old = self.manifest()
        if self._unchanged(old, keys):
            if on_plan:
                on_plan(n, 0)
            return UpdateStats(n, n, 0, 0)
        _check_unique(keys, self.root)  # (the table's own keys, the no-op above, were unique when written)
        files, n_shards, pool_from = self._sources(old)
        have, have_file, have_row, table_rows = _key_index(files, n_shards)
        pos = pc.fill_null(pc.index_in(keys, value_set=have), -1).to_numpy()
        where_file = np.full(n, -1, np.int32)  # per wanted item: the file holding its row (-1: none yet) ...
        where_row = np.zeros(n, np.int32)  # ... and the row
        found = pos >= 0
        where_file[found], where_row[found] = have_file[pos[found]], have_row[pos[found]]
        missing = np.flatnonzero(~found)
        pooled = int(np.count_nonzero(where_file[found] >= pool_from))
        if on_plan:  # what earlier runs left (the table, a killed run's work area, the pool), what is left to do
            on_plan(n - len(missing), len(missing))
        chunks = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
        failed: dict[str, tuple[str, str]] = {}
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
        results = run(_Batches(chunks, spec_of))
        while True:
            try:
                i, table = next(results)
            except StopIteration:
                break
            except Exception as err:  # name the items: the run's failure message shows it
                index = getattr(err, "batch_index", 0)
                ids = [k[:16] for k in keys.take(pa.array(chunks[index])).to_pylist()] if chunks else []
                err.add_note(f"items {', '.join(ids[:4])}{', ...' if len(ids) > 4 else ''} ({len(ids)} in the batch) of {self.root}")
                raise
            chunk = chunks[i]
            if isinstance(table, Partial):
                failed.update(table.errors)
                table = table.table
            asked = keys.take(pa.array(chunk)).to_pylist()
            ok = np.array([k not in failed for k in asked], dtype=bool)
            got = table.column("key").to_pylist()
            if got != [k for k, good in zip(asked, ok) if good]:
                raise RuntimeError(f"compute returned keys out of order for {self.root}")
            interruption_point("batch")  # computed, not saved: the batch is redone
            if got:
                path = work / f"batch-{item_key(got)}.parquet"
                write_parquet(path, table.cast(self.schema), self.options)
                files.append(path)
                where_file[chunk[ok]], where_row[chunk[ok]] = len(files) - 1, np.arange(len(got))
            interruption_point("batch-saved")
            if progress:
                progress(len(chunk))
        dropped = np.flatnonzero(~pc.is_in(have.slice(0, table_rows), value_set=keys).to_numpy(zero_copy_only=False))
        if self.pool and len(dropped):
            self._keep(files, have_file[dropped], have_row[dropped], have.take(pa.array(dropped)))
        if failed:  # in wanted order
            order = pc.index_in(pa.array(list(failed), pa.string()), value_set=keys).to_numpy()
            failed = {k: failed[k] for _, k in sorted(zip(order, failed))}
        made = where_file >= 0
        self._finalize(keys.filter(pa.array(made)), where_file[made], where_row[made], files, n_shards, old, failed)
        stats = UpdateStats(n, n - len(missing), len(missing) - len(failed), len(dropped), pooled, failed)
        if len(failed) > max_error_fraction * n:
            raise TooManyErrors(self.error_summary(stats, max_error_fraction))
        return stats

    def error_summary(self, stats: UpdateStats, max_fraction: float) -> str:
        """Failed items in words: how many of how many, the limit, the first reasons."""
        shown = [f"{item}: {reason}" for item, reason in list(stats.failed.values())[:5]]
        more = f"; ... ({len(stats.failed) - 5} more)" if len(stats.failed) > 5 else ""
        return (f"{len(stats.failed)} of {stats.wanted} items failed in {self.root} (more than errors.max_fraction="
                f"{max_fraction} allows; all in {self.root / ERRORS}, retried by the next run): "
                + "; ".join(shown) + more)

    def _keep(self, files: list[Path], fids: np.ndarray, rows: np.ndarray, keys: pa.Array) -> None:
        """Copy no-longer-wanted rows (the old output's) into the pool before the
        output drops them, each under its own schema: rows of the previous
        encoder keep theirs."""
        schemas = {f: pq.read_schema(files[f]) for f in np.unique(fids).tolist()}
        digests = np.array([schema_digest(schemas[f]) for f in fids.tolist()]) if len(schemas) > 1 else None
        for digest in sorted({schema_digest(s) for s in schemas.values()}):
            pick = np.flatnonzero(digests == digest) if digests is not None else np.arange(len(fids))
            schema = schemas[int(fids[pick[0]])]
            name = f"kept-{keys_digest(keys.take(pa.array(pick)), digest)[:16]}.parquet"
            self._write(self._pool_dir(schema) / name, files, fids[pick], rows[pick], schema)

    def _rows(self, files: list[Path], fids: np.ndarray, rows: np.ndarray, schema: pa.Schema) -> Iterator[pa.Table]:
        """The rows (files[fids[i]], rows[i]), in order, as tables of up to
        `group_rows` rows.  Runs of consecutive rows of one file are sliced,
        not taken row by row; sources are read a row group at a time (the
        last few kept), so an incremental run that interleaves new rows with
        old ones reads each old row group once."""
        if not len(fids):
            return
        groups = RowGroups()
        breaks = np.flatnonzero((np.diff(fids) != 0) | (np.diff(rows) != 1)) + 1
        pieces: list[pa.Table] = []
        count = 0
        for start, end in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(fids)].tolist()):
            path, row, left = files[int(fids[start])], int(rows[start]), end - start
            while left:
                table, offset = groups.locate(path, row)
                take = min(left, table.num_rows - offset, self.group_rows - count)
                pieces.append(_copy_rows(table, offset, take))
                count, row, left = count + take, row + take, left - take
                if count == self.group_rows:
                    yield pa.concat_tables(pieces).cast(schema).combine_chunks()
                    pieces, count = [], 0
        if pieces:
            yield pa.concat_tables(pieces).cast(schema).combine_chunks()

    def _write(self, path: Path, files: list[Path], fids: np.ndarray, rows: np.ndarray,
               schema: pa.Schema | None = None) -> None:
        """One shard, written a row group at a time (fixed group size, so the
        bytes depend on the rows only, not on where they came from).  `schema`:
        the rows' own (pool rows of an earlier encoder); default the table's."""
        schema = schema or self.schema
        options = self.options if schema is self.schema else parquet_options(schema)
        with writing(path) as tmp, pq.ParquetWriter(tmp, schema, **options) as writer:
            for group in self._rows(files, fids, rows, schema):
                writer.write_table(group, row_group_size=self.group_rows)
            if not len(fids):
                writer.write_table(schema.empty_table())

    def _shard_name(self, keys: pa.Array) -> str:
        """A shard's file name: a hash of its keys and the table's metadata (its bytes follow from them)."""
        return f"part-{keys_digest(keys, self.metadata)[:16]}.parquet"

    def _finalize(self, keys: pa.Array, fids: np.ndarray, rows: np.ndarray, files: list[Path], n_shards: int,
                  old: dict[str, Any], failed: dict[str, tuple[str, str]]) -> None:
        """Write the table of `keys` (row i from files[fids[i]], rows[i]).

        Shards of the old table that are full (`shard_rows` rows, every one
        still wanted, same schema and metadata) are kept as they are; every
        other row ("loose": new, from a partial or thinned shard, from the
        pool) goes into new shards of `shard_rows`, in table order.  So at
        most one shard is not full, growth writes about as many bytes as it
        adds wherever the new items fall, and a run from scratch (or one that
        only appends) gives the same bytes as ever.  When the shards read one
        after the other are not in table order, `order-*.parquet` lists the
        table's rows as runs of the shards' concatenation."""
        total = len(keys)
        sizes = [s["rows"] for s in old["shards"]]
        counts = np.bincount(fids, minlength=len(files))[:n_shards] if total else np.zeros(n_shards, np.int64)
        same = old["shards"] and shard_identity(self.root, old) == self.identity()
        kept = [s for s in range(n_shards) if same and sizes[s] == self.shard_rows and counts[s] == sizes[s]]
        is_kept = np.zeros(len(files), bool)
        is_kept[kept] = True
        loose = np.flatnonzero(~is_kept[fids]) if total else np.zeros(0, np.int64)
        entries = []  # (first table position, manifest entry, positions of its rows in storage order or None)
        if kept:
            ids, first = np.unique(fids, return_index=True)
            first_of = dict(zip(ids.tolist(), first.tolist()))
            for s in kept:
                entry = old["shards"][s]
                if "keys" in entry:  # a shard of the first layout: linked under this layout's name for its keys
                    name = self._shard_name(pa.array(entry["keys"], pa.string()))
                    _link(self.root / entry["file"], self.root / name)  # the old name goes after the manifest
                    entry = {"file": name, "rows": entry["rows"], "first": entry["keys"][0], "last": entry["keys"][-1]}
                entries.append((first_of[s], {k: entry[k] for k in ("file", "rows", "first", "last")}, s))
        for start in range(0, max(len(loose), 1), self.shard_rows):
            part = loose[start : start + self.shard_rows]
            part_keys = keys.take(pa.array(part, pa.int64()))
            name = self._shard_name(part_keys)
            path = self.root / name
            if not path.exists():
                self._write(path, files, fids[part], rows[part])
            ends = {"first": part_keys[0].as_py(), "last": part_keys[-1].as_py()} if len(part) else {}
            entries.append((int(part[0]) if len(part) else 0, {"file": name, "rows": len(part), **ends}, part))
        entries.sort(key=lambda e: e[0])
        order_name = None
        if kept:  # where each table row sits in the shards' concatenation
            at = np.empty(total, np.int64)
            offset = 0
            shard_start = np.zeros(len(files), np.int64)  # a kept shard's first row in the concatenation
            for _, entry, what in entries:
                if isinstance(what, int):
                    shard_start[what] = offset
                else:
                    at[what] = offset + np.arange(len(what))
                offset += entry["rows"]
            inside = is_kept[fids]
            at[inside] = shard_start[fids[inside]] + rows[inside]
            breaks = np.flatnonzero(np.diff(at) != 1) + 1
            if len(breaks) or (total and at[0] != 0):
                runs = pa.table({"start": at[np.r_[0, breaks]], "rows": np.diff(np.r_[0, breaks, total])})
                digest = hashlib.sha256(runs.column("start").to_numpy().tobytes() + runs.column("rows").to_numpy().tobytes())
                order_name = f"order-{digest.hexdigest()[:16]}.parquet"
                if not (self.root / order_name).exists():
                    write_parquet(self.root / order_name, runs)
        if failed:  # what failed, beside the shards (a reader of the manifest never sees it)
            stage = self.metadata.get("stage", "")
            errors = [{"key": k, "id": item, "stage": stage, "reason": why} for k, (item, why) in failed.items()]
            write_parquet(self.root / ERRORS, pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
        interruption_point("shards-written")
        shards = [entry for _, entry, _ in entries]
        atomic_write_json(self.root / MANIFEST, {"layout": LAYOUT, "identity": self.identity(), "rows": total,
                                                 "keys": keys_digest(keys), "order": order_name, "shards": shards},
                          fault="manifest-replace")
        keep = {s["file"] for s in shards} | {MANIFEST, order_name} | ({ERRORS} if failed else set()) | self.sidecars
        for entry in self.root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _link(src: Path, dst: Path) -> None:
    """`dst` names the same bytes as `src` (a hard link, or a copy where links fail)."""
    if dst.exists():
        return
    with writing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


@dataclass
class Wanted:
    """The items a table should hold, for tables too big for a list of
    (key, spec) pairs: the keys as an Arrow string array (in table order),
    `spec(i)` making the spec of item i only for the items computed."""

    keys: pa.Array
    spec: Callable[[int], Any]


def _wanted_items(wanted: Sequence[tuple[str, Any]] | Wanted) -> tuple[pa.Array, Callable[[int], Any]]:
    if isinstance(wanted, Wanted):
        keys = wanted.keys.combine_chunks() if isinstance(wanted.keys, pa.ChunkedArray) else wanted.keys
        return keys.cast(pa.string()), wanted.spec
    return pa.array([k for k, _ in wanted], pa.string()), lambda i: wanted[i][1]


def _check_unique(keys: pa.Array, root: Path) -> None:
    if pc.count_distinct(keys).as_py() != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys.to_pylist() if k in seen or seen.add(k))
        raise ValueError(f"duplicate item key {dup} in {root}")


class _Batches(SequenceABC):
    """The specs of each batch of missing items, made when a batch is asked for."""

    def __init__(self, chunks: list[np.ndarray], spec: Callable[[int], Any]):
        self.chunks, self.spec = chunks, spec

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return [self.spec(int(j)) for j in self.chunks[i]]


def _key_index(files: list[Path], n_shards: int) -> tuple[pa.Array, np.ndarray, np.ndarray, int]:
    """Every key the files hold, with its file (an index into `files`) and
    row, as arrays (about 40 bytes a key), and how many of the keys are the
    table's own (those of its first `n_shards` files)."""
    keys, fids, rows, table_rows = [], [], [], 0
    for i, f in enumerate(files):
        if not f.exists():
            continue
        column = pq.read_table(f, columns=["key"]).column("key").combine_chunks().cast(pa.string())
        keys.append(column)
        fids.append(np.full(len(column), i, np.int32))
        rows.append(np.arange(len(column), dtype=np.int32))
        table_rows += len(column) if i < n_shards else 0
    if not keys:
        return pa.array([], pa.string()), np.zeros(0, np.int32), np.zeros(0, np.int32), 0
    return pa.concat_arrays(keys), np.concatenate(fids), np.concatenate(rows), table_rows


def keys_digest(keys: pa.Array, *extra: Any) -> str:
    """A hash of an ordered list of string keys (and `extra`), computed over
    the array's buffers: ~0.1 s for 10M keys, no Python object per key."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    if len(keys):
        wide = pa.types.is_large_string(keys.type)
        offsets = np.frombuffer(keys.buffers()[1], np.int64 if wide else np.int32, len(keys) + 1, keys.offset * (8 if wide else 4))
        h.update(np.diff(offsets).astype("<i8").tobytes())
        data = keys.buffers()[2]
        if data is not None:
            h.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
    return h.hexdigest()[:24]


def schema_identity(schema: pa.Schema) -> str:
    """Columns, types and metadata of a table's shards, as one hash."""
    meta = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in (schema.metadata or {}).items()}
    return item_key(schema_digest(schema), dict(sorted(meta.items())))


def shard_identity(root: Path, manifest: dict[str, Any]) -> str | None:
    """The identity the manifest's shards were written with (an older
    manifest does not say it: the first shard's schema does)."""
    if "identity" in manifest:
        return manifest["identity"]
    first = root / manifest["shards"][0]["file"]
    return schema_identity(pq.read_schema(first)) if first.exists() else None


def _copy_rows(table: pa.Table, first: int, rows: int) -> pa.Table:
    """Rows of a row group, copied: the group itself can then be let go."""
    return table.take(pa.array(range(first, first + rows), pa.int64()))


class RowGroups:
    """Rows of Parquet files by (file, row), read one row group at a time,
    the last `keep` groups kept in memory."""

    def __init__(self, keep: int = 4, columns: list[str] | None = None):
        self.keep = keep
        self.columns = columns
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
            table = pq.ParquetFile(path).read_row_group(group, columns=self.columns)
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


def read_manifest(root: str | Path) -> dict[str, Any]:
    """A table's manifest ({"shards": []} where there is none yet)."""
    path = Path(root) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"shards": []}


def table_order(root: str | Path, manifest: dict[str, Any]) -> list[tuple[int, int]] | None:
    """The table's rows as runs (start, rows) of its shards' concatenation,
    or None when the shards read in order are the table."""
    if not manifest.get("order"):
        return None
    runs = pq.read_table(Path(root) / manifest["order"])
    return list(zip(runs.column("start").to_pylist(), runs.column("rows").to_pylist()))


def read_table(root: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole table named by `root/manifest.json`, in table order."""
    root = Path(root)
    if not (root / MANIFEST).exists():
        raise FileNotFoundError(f"{root} has no {MANIFEST}: run the stage that writes it first")
    manifest = read_manifest(root)
    shards = manifest["shards"]
    tables = [pq.read_table(root / s["file"], columns=columns) for s in shards if s["rows"]]
    if not tables:
        return pq.read_table(root / shards[0]["file"], columns=columns)
    table = pa.concat_tables(tables)
    runs = table_order(root, manifest)
    if runs is None:
        return table
    return table.take(pa.array(np.concatenate([np.arange(s, s + n) for s, n in runs]), pa.int64()))


def iter_rows(root: str | Path, columns: list[str], batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """The table's rows in table order, streamed a record batch (or, for a
    table whose order is not its shards', a row group) at a time."""
    root = Path(root)
    manifest = read_manifest(root)
    shards = [s for s in manifest["shards"] if s["rows"]]
    runs = table_order(root, manifest)
    if runs is None:
        for shard in shards:
            for batch in pq.ParquetFile(root / shard["file"]).iter_batches(batch_size=batch_rows, columns=columns):
                yield from batch.to_pylist()
        return
    starts = np.cumsum([0] + [s["rows"] for s in shards]).tolist()
    groups = RowGroups(columns=columns)
    for start, count in runs:
        while count:
            shard = bisect.bisect_right(starts, start) - 1
            table, offset = groups.locate(root / shards[shard]["file"], start - starts[shard])
            take = min(count, table.num_rows - offset, starts[shard + 1] - start)
            yield from table.slice(offset, take).to_pylist()
            start, count = start + take, count - take


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
    first = read_manifest(root)["shards"][0]["file"]
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
