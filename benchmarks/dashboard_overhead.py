"""Reporting to a persistent `mirage server` vs Prefect's temporary server, side by side.

A pipeline run that reruns one stage (evaluate, with a new `evaluate.grid_images`
each time so neither DVC nor its run-cache can skip it) on a copy of a finished
project, alternating: with `mirage server` up (the run reports there: artifacts,
assets, tags) and without (a temporary server per run), plus a scheduled-style
no-op run.  Run from a project whose pipeline is up to date (`mirage run` first):

    .venv/bin/python benchmarks/dashboard_overhead.py --repeats 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MIRAGE = [sys.executable, "-m", "mirage.cli"]


def run(root: Path, env: dict, *args: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([*MIRAGE, "--root", str(root), *args], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"mirage {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="a finished project (default: here)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    src = Path(args.root).resolve()
    work = Path(tempfile.mkdtemp(prefix="mirage-dash-bench-"))
    root = work / "project"
    shutil.copytree(src, root, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "server.json"))
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "config", "core.no_scm", "true"], cwd=root, check=True)  # a copy without .git
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = iter(range(100, 200))
    temporary, persistent = [], []
    server = None
    try:
        for _ in range(args.repeats):  # interleaved, so drift affects both alike
            temporary.append(run(root, env, "run", "-S", f"evaluate.grid_images={next(grid)}"))
            server = subprocess.Popen([*MIRAGE, "--root", str(root), "server", "--port", str(port)], cwd=root,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(1)
            persistent.append(run(root, env, "run", "-S", f"evaluate.grid_images={next(grid)}"))
            noop = run(root, env, "run")
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            server = None
    finally:
        if server:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    t, p = statistics.median(temporary), statistics.median(persistent)
    print(f"temporary server   median {t:.1f} s  ({', '.join(f'{x:.1f}' for x in temporary)})  [evaluate reran]")
    print(f"mirage server      median {p:.1f} s  ({', '.join(f'{x:.1f}' for x in persistent)})  [evaluate reran]")
    print(f"persistent - temporary = {p - t:+.1f} s  (ratio {p / t:.2f})")
    print(f"no-op `mirage run` with the server up: {noop:.2f} s")


if __name__ == "__main__":
    main()
