"""Fault injection for tests: make this process die by SIGKILL at a named point.

`MIRAGE_FAULT=<point>` (or `<point>@<n>`: the n-th time this process gets
there) kills the process with SIGKILL, as a pre-empted machine or the OOM
killer would: no cleanup code runs.  With `MIRAGE_FAULT_MARKER=<path>` it
fires once in all processes together (the first to create that file), so the
work rescheduled after the kill gets through.  Unset (always, outside tests),
a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_HITS: Counter = Counter()


def point(name: str) -> None:
    """Die here if MIRAGE_FAULT names this point."""
    wanted = os.environ.get("MIRAGE_FAULT")
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _HITS[name] += 1
    if _HITS[name] != int(nth or 1):
        return
    marker = os.environ.get("MIRAGE_FAULT_MARKER")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process already died here
    os.kill(os.getpid(), signal.SIGKILL)
