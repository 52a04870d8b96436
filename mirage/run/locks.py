"""One mirage run per workspace: the run lock.

`.mirage/run.lock` is flock'ed by a `mirage run` (or a scheduled run) from
before params.yaml is touched until it ends, and by every stage command run
as its own process (`dvc repro` unlocks DVC's repo lock while a stage command
runs).  The kernel drops the lock when its holder dies, even by SIGKILL: no
stale lock.  Standard library only: every stage imports it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


class PipelineError(RuntimeError):
    """The pipeline cannot start: what is missing and how to get it."""


class WorkspaceBusy(PipelineError):
    """Another pipeline run (or `dvc repro`) holds the workspace."""


_RUN_LOCKS: dict[Path, int] = {}  # project root -> how deep this process holds its run lock


@contextlib.contextmanager
def run_lock(root: Path):
    """One mirage run per workspace, taken before params.yaml is touched:
    `.mirage/run.lock`, flock'ed (the kernel drops it when the process dies,
    even by SIGKILL: no stale lock).  Re-entrant within this process (a
    `mirage run` and the pipeline flow it starts).  A second run exits at
    once, naming the first."""
    root = Path(root).resolve()
    if root in _RUN_LOCKS:
        _RUN_LOCKS[root] += 1
        try:
            yield
        finally:
            _RUN_LOCKS[root] -= 1
        return
    path = root / ".mirage" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip()
        os.close(fd)
        raise WorkspaceBusy(f"another mirage run or a stage of `dvc repro` ({holder or 'pid unknown'}) is using "
                            f"{root}: this run did nothing, params.yaml is as it was; try again when it ends") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _RUN_LOCKS[root] = 1
    try:
        yield
    finally:
        del _RUN_LOCKS[root]
        os.ftruncate(fd, 0)  # the file names its holder only while held
        os.close(fd)  # releases the lock


