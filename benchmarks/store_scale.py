"""The store's own cost per item at 10k .. 10M items: the store before this
layout (loaded from git) and now, side by side in one run.

Tiny rows (a key and an int), so what shows is the store, not a model:
`shard_rows` 1024, batches of 128, each case in a fresh process (its peak
RSS is the case's).  Cases: from scratch; a no-op (the same keys again); +1%
appended; +1% interleaved (a new item after every 100th, as raising
`generate.per_prompt` grows a table).  For the growth cases, the bytes of
shard files written (new names) as a share of the table's bytes.  The
current store runs twice: given a list of (key, spec) pairs (what the stages
pass today) and given `Wanted` (keys as an Arrow array, specs on demand).
The keys themselves are made before the clock starts.

    .venv/bin/python benchmarks/store_scale.py --sizes 10000 100000 1000000
    .venv/bin/python benchmarks/store_scale.py --sizes 10000000 --variants "now (Wanted)" "before (list)"
        # ~17 minutes, 6.3 GB peak for the old store
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "4a720a8"  # the last commit with the store that listed every key in its manifest
SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])
CASES = ["scratch", "no-op", "+1% at the end", "+1% interleaved"]
VARIANTS = ["before (list)", "now (list)", "now (Wanted)"]


def bulk_keys(n: int, salt: int, chunk: int = 1 << 20) -> pa.Array:
    """n distinct 16-hex-digit keys (splitmix64 of 0..n-1), made by numpy a
    million at a time (so the keys, ~20 bytes each, are what stays in memory)."""
    if n > chunk:
        return pa.concat_arrays([_hex_keys(start, min(n, start + chunk), salt) for start in range(0, n, chunk)])
    return _hex_keys(0, n, salt)


def _hex_keys(start: int, end: int, salt: int) -> pa.Array:
    n = end - start
    x = np.arange(start, end, dtype=np.uint64) + np.uint64(salt << 40)
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    nibbles = (x[:, None] >> (np.arange(15, -1, -1, dtype=np.uint64) * np.uint64(4))) & np.uint64(15)
    chars = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles.astype(np.intp)]
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 16).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(chars.tobytes())])


def wanted_keys(case: str, n: int) -> pa.Array:
    old = bulk_keys(n, 1)
    if case in ("scratch", "no-op"):
        return old
    new = bulk_keys(n // 100, 2)
    if case == "+1% at the end":
        return pa.concat_arrays([old, new])
    at = np.arange(len(new)) * 100 + 100  # after every 100th old item
    order = np.argsort(np.concatenate([np.arange(n), at - 0.5]), kind="stable")
    return pa.concat_arrays([old, new]).take(pa.array(order))


def load_store(variant: str):
    if not variant.startswith("before"):
        sys.path.insert(0, str(ROOT))
        from mirage.data import store
        return store
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:mirage/data/store.py"],
                           capture_output=True, text=True)
    if shown.returncode:
        raise SystemExit(f"the store before (commit {BEFORE}) is not in this clone's history "
                         f"(`git fetch --unshallow`), or leave it out: --variants 'now (list)' 'now (Wanted)'")
    source = shown.stdout
    path = Path(tempfile.mkdtemp(prefix="mirage-store-before-")) / "store_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("store_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["store_before"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child(variant: str, case: str, n: int, table: str) -> None:
    """One case in this process: print seconds, peak RSS, bytes written."""
    store = load_store(variant)
    keys = wanted_keys(case, n)

    def compute(specs):
        return pa.table({"key": keys.take(pa.array(specs, pa.int64())), "value": pa.array(specs, pa.int64())},
                        schema=SCHEMA)

    if variant.endswith("(Wanted)"):
        wanted = store.Wanted(keys, lambda i: i)
    else:
        wanted = list(zip(keys.to_pylist(), range(len(keys))))
    root = Path(table)
    before = {p.name: p.stat().st_size for p in root.glob("*.parquet")}
    start = time.perf_counter()
    stats = store.ShardStore(root, SCHEMA, {"stage": "bench"}, shard_rows=1024).update(wanted, compute, batch_size=128)
    seconds = time.perf_counter() - start
    after = {p.name: p.stat().st_size for p in root.glob("*.parquet")}
    written = sum(size for name, size in after.items() if name not in before)
    print(json.dumps({"seconds": seconds, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "computed": stats.computed, "written": written, "table_bytes": sum(after.values()),
                      "manifest_kb": (root / "manifest.json").stat().st_size / 1024}))


def run_case(variant: str, case: str, n: int, table: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, case, str(n), str(table)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{variant} {case} at {n} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(variant: str, n: int, tmp: Path) -> dict[str, dict]:
    base = tmp / f"{variant[:6].strip()}-{n}-base"
    got = {"scratch": run_case(variant, "scratch", n, base)}
    for case in CASES[1:]:
        table = tmp / f"{variant[:6].strip()}-{n}-{case[:4]}"
        shutil.copytree(base, table)
        got[case] = run_case(variant, case, n, table)
        shutil.rmtree(table)
    shutil.rmtree(base)
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, case, n, table = args.child
        return child(variant, case, int(n), table)
    tmp = Path(tempfile.mkdtemp(prefix="mirage-store-scale-"))
    results = {}
    try:
        print("| N | store | scratch µs/item | no-op s | +1% end µs/item | +1% interleaved µs/item "
              "| rewritten (end / interleaved) | peak RSS no-op | manifest |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in args.sizes:
            for variant in args.variants:
                got = results.setdefault(str(n), {})[variant] = measure(variant, n, tmp)
                per = lambda case: f"{got[case]['seconds'] / n * 1e6:.1f}"  # noqa: E731
                share = lambda case: f"{got[case]['written'] / got[case]['table_bytes']:.1%}"  # noqa: E731
                print(f"| {n:,} | {variant} | {per('scratch')} | {got['no-op']['seconds']:.2f} | {per('+1% at the end')} "
                      f"| {per('+1% interleaved')} | {share('+1% at the end')} / {share('+1% interleaved')} "
                      f"| {got['no-op']['rss_mb']:.0f} MB | {got['no-op']['manifest_kb']:.0f} KB |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
