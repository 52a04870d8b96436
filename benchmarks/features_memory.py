"""Peak memory of the features stage at N and at 10N images, side by side.

Each size runs in its own fresh process (`--child`), so its peak RSS
(ru_maxrss) is the stage's alone: the encoder and patch backbone of params.yaml
(the toy profile's), patch features on, images streamed from Parquet.
Target (issue 4): peak RSS at 10N / at N <= 1.2.

    .venv/bin/python benchmarks/features_memory.py --n 300
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, images_table, prefect_server, project_params


def child(images: str, out: str) -> None:
    from flows.features import features_flow

    cfg = project_params().features
    with prefect_server():
        result = features_flow(cfg, images, str(ROOT / "models" / "generator"), out)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, **result}))


def run(images: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(images), str(out)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--size", type=int, default=32, help="image size in px (the toy profile's)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    tmp = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    try:
        cfg = project_params().features
        results = {}
        for n in (args.n, 10 * args.n):
            images = images_table(tmp / f"images-{n}", n, args.size)
            results[n] = run(images, tmp / f"features-{n}")
            assert results[n]["computed"] == n, results[n]
        small, big = results[args.n], results[10 * args.n]
        print(f"features stage, encoder {cfg.encoder}, patches {cfg.patch_backbone if cfg.patches else 'off'}, "
              f"batch {cfg.batch_size}, {args.size} px images")
        for n, r in results.items():
            print(f"  {n:6d} images: peak RSS {r['peak_rss_mb']:7.1f} MB")
        print(f"ratio peak RSS 10N/N = {big['peak_rss_mb'] / small['peak_rss_mb']:.3f}  (target <= 1.2)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
