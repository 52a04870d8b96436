"""Stage concepts' cost, measured side by side in one run (issue 21's targets).

1. Activation passes: images per second of `chunk_moments`' forward work
   (every unit's map captured by hooks and resized to the grid, trained and
   random-weight models) against the bare forward of the same four models on
   the same batches (target >= 0.8).
2. Accumulation: the time of the moment sums (float64) against the matrix
   multiply bound: one float64 matmul of the same shapes, the floor of any
   way of computing the cross-moments.
3. Memory: peak RSS of the moments of N and of 4N images, each in a fresh
   process (target: flat, <= 1.2x).

    .venv/bin/python benchmarks/concepts_speed.py --n 256
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from _common import ROOT, project_params

GENERATOR = str(ROOT / "models" / "generator")
ENCODER = str(ROOT / "models" / "encoder")


def images(n: int, seed: int = 0) -> np.ndarray:
    """Toy-world scenes (the test split's world), uint8 n x 32 x 32 x 3."""
    from mirage.data.images import decode_png
    from tasks.toyworld import render_batch, scene_key

    tw = project_params().toyworld
    split = tw.test.model_copy(update={"n": n, "seed": seed})
    table = render_batch(tw, split, [(scene_key(tw, split, i), i) for i in range(n)])
    return np.stack([decode_png(b) for b in table.column("image").to_pylist()])


def models():
    from tasks.concepts import load_models

    return load_models(project_params().concepts, GENERATOR, [ENCODER], torch.device("cpu"))


def passes(m, pixels: np.ndarray, batch: int) -> dict:
    """Seconds of the hooked passes vs the bare forwards, same batches."""
    name = next(iter(m.encoders))
    gens, encs = (m.generator, m.random_generator), (m.encoders[name], m.random_encoders[name])

    def bare():
        for start in range(0, len(pixels), batch):
            part = pixels[start : start + batch]
            for g in gens:
                x = torch.from_numpy(part).permute(0, 3, 1, 2).float() / 127.5 - 1
                t = torch.full((len(x),), g.timestep, dtype=torch.long)
                with torch.inference_mode():
                    g.net(g.scheduler.add_noise(x, torch.zeros_like(x), t), t,
                           class_labels=torch.full((len(x),), g.pipe.null_class))
            for e in encs:
                with torch.inference_mode():
                    e.encoder.model.encode_image(e.encoder.preprocess(part))

    def hooked():
        for start in range(0, len(pixels), batch):
            part = pixels[start : start + batch]
            for u in (*gens, *encs):
                u.maps(part)

    out = {}
    for label, fn in (("bare", bare), ("hooked", hooked), ("bare ", bare), ("hooked ", hooked)):  # twice: warm
        start = time.perf_counter()
        fn()
        out[label.strip()] = time.perf_counter() - start
    return out


def accumulation(m, pixels: np.ndarray, batch: int) -> dict:
    from tasks.concept_stats import Accumulator
    from tasks.concepts import rows

    name = next(iter(m.encoders))
    g = [rows(m.generator.maps(pixels[s : s + batch])) for s in range(0, len(pixels), batch)]
    e = [rows(m.encoders[name].maps(pixels[s : s + batch])) for s in range(0, len(pixels), batch)]
    start = time.perf_counter()
    acc = Accumulator()
    for a, b in zip(g, e):
        acc.add(a, b)
    acc.moments(g[0].shape[1], e[0].shape[1])
    sums = time.perf_counter() - start
    a, b = torch.cat(g).double(), torch.cat(e).double()
    start = time.perf_counter()
    a.T @ b
    bound = time.perf_counter() - start
    return {"sums_s": sums, "matmul_bound_s": bound, "rows": len(a), "units": [a.shape[1], b.shape[1]]}


def child(n: int, batch: int) -> None:
    from tasks.concepts import chunk_moments

    m = models()
    pixels = images(n, seed=7)
    chunk_moments(m, [(f"k{i}", im) for i, im in enumerate(pixels)], batch)
    print(json.dumps({"n": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def rss(n: int, batch: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch", str(batch)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="images (the RSS check also runs 4n)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args.child, args.batch)
    torch.manual_seed(0)
    m = models()
    pixels = images(args.n)
    t = passes(m, pixels, args.batch)
    print(f"activation passes, {args.n} images, batch {args.batch}, 2 generators + 2 encoders (trained, random):")
    print(f"  bare forward {args.n / t['bare']:.0f} img/s, hooked with maps {args.n / t['hooked']:.0f} img/s: "
          f"ratio {t['bare'] / t['hooked']:.2f} (target >= 0.8)")
    a = accumulation(m, pixels, args.batch)
    print(f"moment sums over {a['rows']} rows x {a['units']} units: {a['sums_s']:.3f} s; one float64 matmul of the "
          f"same shapes {a['matmul_bound_s']:.3f} s: bound / sums {a['matmul_bound_s'] / a['sums_s']:.2f}")
    small, big = rss(args.n, args.batch), rss(4 * args.n, args.batch)
    print(f"peak RSS: {small['peak_rss_mb']:.0f} MB at {args.n} images, {big['peak_rss_mb']:.0f} MB at {4 * args.n}: "
          f"ratio {big['peak_rss_mb'] / small['peak_rss_mb']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
