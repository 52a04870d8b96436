"""Where a stage's batches run: in this process, or as Prefect tasks on Dask workers.

A stage describes its work as a *job*: a small picklable object (the stage's
params) with
- `load_key()`: what `load()` builds, e.g. (model, device, dtype);
- `load()`: the heavy part, built once per process (models);
- `describe(loaded, *args)`: facts the stage plans with (the model's
  fingerprint, its native size, its embedding width), computed where the model is;
- `prepare(loaded, batch)` and `compute(loaded, prepared)`: one batch's rows.

Each process (this one, or a Dask worker) loads a job once and reuses it for
all its batches: the model is never pickled with a task.  Results come back
in any order; the store writes them in key order, so the runner never changes
a byte of the output (`runner` is in no item key and no stage's params).
Dask reschedules the batches of a worker that dies; batches already back are
in the store's work area and are not recomputed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from mirage.data.params import Runner
from mirage.run import faults

_LOADED: "OrderedDict[Any, tuple[str, Any]]" = OrderedDict()
_LOADED_LOCK = threading.Lock()
KEEP_LOADED = 2  # jobs kept loaded per process (two stages may run at once)


def loaded(job) -> tuple[str, Any]:
    """(load id, job.load()) for this process, loading it on first use.  The
    load id is unique per load: counting distinct ids counts model loads."""
    key = job.load_key()
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    obj = job.load()  # outside the lock: another stage's job may load meanwhile
    with _LOADED_LOCK:
        entry = _LOADED.setdefault(key, (f"{os.getpid()}-{uuid.uuid4().hex[:8]}", obj))
        while len(_LOADED) > KEEP_LOADED:
            _LOADED.popitem(last=False)
        return entry


def release(job) -> None:
    """Drop this process's loaded copy of `job` (its models)."""
    with _LOADED_LOCK:
        _LOADED.pop(job.load_key(), None)


def _note_batch(err: BaseException, index: int) -> BaseException:
    err.batch_index = index  # the store names the batch's items
    return err


class BatchTooLarge(RuntimeError):
    """A batch ran out of (GPU) memory: the message names the batch-size key
    and a value to try.  Not retried: the same batch would fail again."""


def compute(job, obj: Any, prepared: Any) -> Any:
    """One batch's rows; out of memory becomes BatchTooLarge, naming the key."""
    import torch

    try:
        faults.point("compute")
        return job.compute(obj, prepared)
    except torch.cuda.OutOfMemoryError as err:
        key, size = getattr(job, "batch_param", ("the stage's batch size", None))
        hint = f"`-S {key}={max(1, size // 2)}`" if size else "a smaller batch size"
        raise BatchTooLarge(
            f"out of memory computing a batch ({key}={size}): try {hint}. Batches finished so far stay in the "
            f"work area (a rerun at {size} resumes there); the batch size is part of each item's key, so at "
            f"another size the items are computed again") from err


def retrying(cfg: Runner, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, tried again `runner.retries` times after a failure, waiting
    `runner.retry_delay` seconds, doubled each time (what Prefect's task
    retries do on Dask).  A stopped run, or a batch too large, is not retried."""
    from mirage.run.stage import StageStopped, logger

    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except (StageStopped, BatchTooLarge):
            raise
        except Exception as err:
            if attempt == cfg.retries:
                raise
            delay = cfg.retry_delay * 2 ** attempt
            logger().warning("%s failed (%s: %s): retry %d of %d in %.1f s", what,
                                                type(err).__name__, err, attempt + 1, cfg.retries, delay)
            time.sleep(delay)


# -- the work a Dask worker does ---------------------------------------------
@task(name="describe", cache_policy=NO_CACHE)
def describe_task(job, args: tuple) -> tuple[str, Any]:
    load_id, obj = loaded(job)
    return load_id, job.describe(obj, *args)


@task(name="batch", cache_policy=NO_CACHE)
def batch_task(job, first: int, batches: list) -> tuple[int, list, str, float]:
    """Consecutive batches on a worker: (index of the first, their rows, load id,
    seconds computing).  Each batch is computed on its own, as on the local
    runner: grouping them only spares Prefect's per-task cost."""
    load_id, obj = loaded(job)
    start = time.perf_counter()
    outs = []
    for batch in batches:
        faults.point("dask-batch")  # tests: a worker killed mid-stage
        outs.append(compute(job, obj, job.prepare(obj, batch)))
    return first, outs, load_id, time.perf_counter() - start


# -- runners -----------------------------------------------------------------
class LocalRunner:
    """Batches in this process, in order, `prefetch` batches prepared ahead
    in a background thread."""

    kind = "local"

    def __init__(self, cfg: Runner = Runner(), stage: str = "stage"):
        self.cfg, self.stage = cfg, stage
        self.loads: set[str] = set()
        self.compute_seconds = 0.0
        self._jobs: list = []

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        for job in self._jobs:
            release(job)  # a stage's models are not kept after it ends

    def _loaded(self, job) -> Any:
        load_id, obj = loaded(job)
        self.loads.add(load_id)
        self._jobs.append(job)
        return obj

    def describe(self, job, *args) -> Any:
        return job.describe(self._loaded(job), *args)

    def map(self, job, batches: Sequence[Any], fetch: Callable[[Any], Any] | None = None,
            prefetch: int = 0) -> Iterator[tuple[int, Any]]:
        """(index, rows) of every batch; `fetch(batch)` first adds its inputs
        (e.g. image bytes), in batch order."""
        from mirage.data.store import prepared_ahead

        obj = self._loaded(job)
        fetch = fetch or (lambda b: b)
        ahead = prepared_ahead(batches, lambda b: job.prepare(obj, fetch(b)), prefetch)
        for index, (_, prepared) in enumerate(ahead):
            start = time.perf_counter()
            try:
                out = retrying(self.cfg, f"{self.stage} batch {index}", lambda: compute(job, obj, prepared))
            except Exception as err:
                raise _note_batch(err, index)
            self.compute_seconds += time.perf_counter() - start
            yield index, out


class DaskRunner:
    """Batches as Prefect tasks (one task run each) on a `prefect_dask.DaskTaskRunner`:
    a LocalCluster of `n_workers` x `threads_per_worker`, `cluster_class` with
    `cluster_kwargs`, or the scheduler at `address`.  At most `window` batches
    are in flight, so memory holds a few batches whatever the table's size."""

    kind = "dask"

    def __init__(self, cfg: Runner, stage: str):
        self.cfg, self.stage = cfg, stage
        self.loads: set[str] = set()
        self.compute_seconds = 0.0
        self._stack = contextlib.ExitStack()
        self.task_runner = None

    def __enter__(self) -> "DaskRunner":
        from prefect_dask import DaskTaskRunner

        cfg = self.cfg
        if cfg.address or _SHARED:  # a running cluster: the user's, or this pipeline run's
            kwargs = {"address": cfg.address or _SHARED["address"]}
        else:
            kwargs = {"cluster_class": cfg.cluster_class, "cluster_kwargs": cluster_kwargs(cfg),
                      "adapt_kwargs": cfg.adapt}
        if not _SHARED:
            self._stack.enter_context(_worker_environment(pin_threads=not cfg.address and not cfg.cluster_class))
        self.task_runner = self._stack.enter_context(DaskTaskRunner(**kwargs))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)

    def describe(self, job, *args) -> Any:
        task = describe_task.with_options(name=f"{self.stage}-describe")
        load_id, out = self.task_runner.submit(task, {"job": job, "args": args}).result()
        self.loads.add(load_id)
        return out

    def map(self, job, batches: Sequence[Any], fetch: Callable[[Any], Any] | None = None,
            prefetch: int = 0) -> Iterator[tuple[int, Any]]:
        """(index, rows) as batches finish, in any order; `fetch(batch)` runs
        here, in batch order, just before the batch is sent.  Consecutive
        batches go together in one task (`runner.batches_per_task`)."""
        import distributed

        delays = [self.cfg.retry_delay * 2 ** i for i in range(self.cfg.retries)]
        task = batch_task.with_options(name=f"{self.stage}-batch", retries=self.cfg.retries,
                                       retry_delay_seconds=delays or 0,
                                       retry_condition_fn=_retry_unless_too_large)
        fetch = fetch or (lambda b: b)
        per_task = self.batches_per_task(len(batches))
        groups = iter(range(0, len(batches), per_task))
        pending: dict = {}  # dask future -> (first index, size, prefect future)

        def send() -> None:
            for first in groups:
                group = [fetch(b) for b in batches[first : first + per_task]]
                future = self.task_runner.submit(task, {"job": job, "first": first, "batches": group})
                pending[future.wrapped_future] = (first, len(group), future)
                if len(pending) >= self.window():
                    return

        send()
        try:
            while pending:
                with distributed.Client.as_current(self.task_runner.client):
                    done, _ = distributed.wait(list(pending), return_when="FIRST_COMPLETED")
                for wrapped in done:
                    first, size, future = pending.pop(wrapped)
                    try:
                        _, outs, load_id, seconds = future.result()
                    except Exception as err:
                        raise _note_batch(err, first)
                    self.loads.add(load_id)
                    self.compute_seconds += seconds
                    for offset, out in enumerate(outs):
                        yield first + offset, out
                send()
        finally:
            for wrapped in pending:
                wrapped.cancel()

    def threads(self) -> int:
        return sum(self.task_runner.client.nthreads().values()) or 1

    def window(self) -> int:
        return max(2, 2 * self.threads())

    def batches_per_task(self, n_batches: int) -> int:
        """`runner.batches_per_task`; auto: the fewest tasks per worker thread
        with at most 8 batches each (what a task holds in memory until it
        returns), so the batches split evenly over the threads: 10 batches on
        2 threads are 2 tasks of 5; 160 are 20 tasks of 8, balanced as they finish."""
        if self.cfg.batches_per_task != "auto":
            return self.cfg.batches_per_task
        threads = self.threads()
        per_thread = max(1, math.ceil(n_batches / (threads * 8)))  # tasks per thread
        return max(1, math.ceil(n_batches / (threads * per_thread)))


def _retry_unless_too_large(task, task_run, state) -> bool:
    """Prefect's retry condition: every failure but an out-of-memory batch."""
    try:
        state.result()
    except BatchTooLarge:
        return False
    except Exception:
        return True
    return True


_SHARED: dict[str, str] = {}  # {"address": ...} of the cluster this pipeline run shares


def cluster_kwargs(cfg: Runner) -> dict[str, Any]:
    """What DaskTaskRunner (or shared_cluster) starts for a stage: a LocalCluster
    of n_workers x threads_per_worker on 127.0.0.1 (no web dashboard), or
    cluster_class(**cluster_kwargs)."""
    if cfg.cluster_class:
        return dict(cfg.cluster_kwargs)
    return {"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker, "processes": True,
            "host": "127.0.0.1", "dashboard_address": None} | dict(cfg.cluster_kwargs)


@contextlib.contextmanager
def shared_cluster(cfg: Runner):
    """One cluster for all the stages of a pipeline run (`runner.kind: dask`
    without an address): workers start, and load each model, once per run
    instead of once per stage."""
    if cfg.kind != "dask" or cfg.address or _SHARED:
        yield
        return
    import distributed
    from prefect.utilities.importtools import from_qualified_name

    make = from_qualified_name(cfg.cluster_class) if cfg.cluster_class else distributed.LocalCluster
    with _worker_environment(pin_threads=not cfg.cluster_class), make(**cluster_kwargs(cfg)) as cluster:
        if cfg.adapt:
            cluster.adapt(**cfg.adapt)
        _SHARED["address"] = cluster.scheduler_address
        try:
            yield
        finally:
            _SHARED.clear()


def open_runner(cfg: Runner, stage: str) -> LocalRunner | DaskRunner:
    """The runner `runner.kind` asks for (use as a context manager)."""
    return DaskRunner(cfg, stage) if cfg.kind == "dask" else LocalRunner(cfg, stage)


@contextlib.contextmanager
def _worker_environment(pin_threads: bool):
    """What worker processes started from here inherit: the Prefect API this
    run reports to (else each worker would start a temporary server of its
    own), quiet Dask logs and, with `pin_threads` (a LocalCluster), this
    process's number of intra-op threads.  CPU float results depend on that
    count (Dask's default is 1 per worker): pinned, a LocalCluster computes
    the same bytes as the local runner on this machine."""
    import dask
    import torch
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    env = {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": "warning"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if not os.environ.get(k)})
    level = logging.getLogger("distributed").level
    logging.getLogger("distributed").setLevel(logging.WARNING)
    threads = str(torch.get_num_threads())
    pinned = {f"distributed.nanny.pre-spawn-environ.{k}": threads  # torch's, and numpy's and scipy's BLAS
              for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} if pin_threads else {}
    if pin_threads:  # more threads than cores: idle threads must sleep, not spin on a core another worker needs
        pinned["distributed.nanny.pre-spawn-environ.OMP_WAIT_POLICY"] = "PASSIVE"
        pinned["distributed.nanny.pre-spawn-environ.OPENBLAS_THREAD_TIMEOUT"] = "4"  # OpenBLAS's shortest spin
    try:
        with dask.config.set(pinned):
            yield
    finally:
        logging.getLogger("distributed").setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
