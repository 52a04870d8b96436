"""No-op pipeline run vs `dvc status`, side by side in one run.

Target (design.md): `mirage run` with nothing stale takes <= 2x `dvc status`.
Run from a project whose pipeline is up to date:

    .venv/bin/python benchmarks/noop_run.py --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    status = subprocess.run([str(BIN / "mirage"), "status"], capture_output=True, text=True).stdout
    if "nothing stale" not in status:
        raise SystemExit(f"the pipeline is not up to date; run `mirage run` first:\n{status}")
    dvc, mirage = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        dvc.append(timed([str(BIN / "dvc"), "status"]))
        mirage.append(timed([str(BIN / "mirage"), "run"]))
    d, m = statistics.median(dvc), statistics.median(mirage)
    print(f"dvc status      median {d:.2f} s  ({', '.join(f'{t:.2f}' for t in dvc)})")
    print(f"mirage run      median {m:.2f} s  ({', '.join(f'{t:.2f}' for t in mirage)})  [nothing stale]")
    print(f"ratio mirage/dvc = {m / d:.2f}  (target <= 2.0)")


if __name__ == "__main__":
    main()
