"""Fault injection for tests: make this process fail at a named point.

`MIRAGE_FAULT=<point>[@<n>[+]][:<action>]` acts the n-th time (default the
first) this process gets to `point`, or with `+` the n-th and every later
time.  Actions:
- `kill` (default): SIGKILL, as a pre-empted machine or the OOM killer would:
  no cleanup code runs;
- `raise`: an `InjectedFault` (a flaky batch: retried like any failure);
- `oom`: the error PyTorch raises when a GPU runs out of memory;
- `enospc`: the OSError of a full disk;
- `wait`: pause here until the file `MIRAGE_FAULT_RELEASE` exists, after
  writing `<that path>.waiting` (the pid): a test holds a run at a known
  point, does what it checks beside it, then lets it go on.
With `MIRAGE_FAULT_MARKER=<path>` a kill fires once in all processes together
(the first to create that file), so the work rescheduled after it gets
through.  Unset (always, outside tests), a point costs one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
from collections import Counter

_HITS: Counter = Counter()


class InjectedFault(RuntimeError):
    """A failure injected by MIRAGE_FAULT (tests)."""


def reset() -> None:
    """Forget the points reached so far (tests running several cases in one process)."""
    _HITS.clear()


def point(name: str) -> None:
    """Fail here as MIRAGE_FAULT says, if it names this point."""
    wanted = os.environ.get("MIRAGE_FAULT")
    if not wanted:
        return
    spec, _, action = wanted.partition(":")
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _HITS[name] += 1
    every = nth.endswith("+")
    first = int(nth.rstrip("+") or 1)
    if _HITS[name] != first and not (every and _HITS[name] > first):
        return
    if action in ("", "kill"):
        marker = os.environ.get("MIRAGE_FAULT_MARKER")
        if marker:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another process already died here
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise InjectedFault(f"injected fault at {name} (hit {_HITS[name]})")
    elif action == "oom":
        import torch

        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at {name})")
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {name})")
    elif action == "wait":
        import time

        release = os.environ.get("MIRAGE_FAULT_RELEASE")
        if not release:
            raise ValueError(f"MIRAGE_FAULT={wanted!r}: the wait action needs MIRAGE_FAULT_RELEASE=<path>")
        with open(f"{release}.waiting", "w") as out:
            out.write(str(os.getpid()))
        while not os.path.exists(release):
            time.sleep(0.1)
    else:
        raise ValueError(f"MIRAGE_FAULT={wanted!r}: unknown action {action!r} (kill, raise, oom, enospc, wait)")


def install() -> None:
    """Act at the store's interruption points too (mirage.data.store), once per process."""
    from mirage.data.store import add_interruption_hook

    add_interruption_hook(point)


install()  # every stage command, runner and worker imports this module before any store writes
