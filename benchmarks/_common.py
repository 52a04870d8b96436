"""What the stage benchmarks share: a Prefect server, params, an images table."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# benchmarks never read or fill the project's pool of kept rows
os.environ["MIRAGE_POOL"] = tempfile.mkdtemp(prefix="mirage-bench-pool-")

from mirage.data import params

from mirage.data import schema
from mirage.data.images import encode_png  # noqa: E402
from mirage.data.store import ShardStore, item_key  # noqa: E402


@contextlib.contextmanager
def prefect_server():
    """A temporary Prefect server (what `mirage run` talks to), quiet."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    logging.getLogger("prefect").setLevel(logging.WARNING)
    with prefect_test_harness(server_startup_timeout=120):
        yield


def project_params() -> params.Params:
    return params.load(ROOT / "params.yaml")


def images_table(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` smooth random RGB images of `size` px in the images schema."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = np.kron(low, np.ones((8, 8, 1), dtype=np.uint8))[:size, :size]
        key = item_key("bench-image", seed, i)
        rows.append({"key": key, "id": f"b-{key[:16]}", "image": encode_png(img), "width": size, "height": size,
                     "prompt": "", "class_name": "", "seed": i, "model": "bench", "steps": 0, "guidance": 0.0})
    store = ShardStore(root, schema.IMAGES, {"stage": "bench"}, shard_rows=1024)
    store.update([(r["key"], r) for r in rows], lambda b: pa.Table.from_pylist(b, schema=schema.IMAGES), 1024)
    return root


def sync(device) -> None:
    """Wait for a GPU's queued work before reading the clock (a no-op on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out
