"""Normalized cut at MaskCut's size: dense generalized eigh vs mirage's solvers.

MaskCut solves (D - A) x = lambda D x densely (scipy.linalg.eigh with b=D) on
3600 patches (ViT-B/8 at 480 px).  mirage solves the symmetric normalized
problem with ARPACK (eigsh, `discover.solver: scipy`, one image at a time) or
with batched Lanczos in torch (`discover.solver: torch`, a batch of images
together, on the GPU when there is one).  Same affinity, same bipartition
rule; this prints each solver's time per graph, their ratios to the dense
solve (the affinity matrices are built once, for all) and the IoU of their
bipartitions to the dense one's.

    .venv/bin/python benchmarks/ncut_speed.py --nodes 3600 --repeats 5 --batch 8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch

from mirage.models.devices import resolve_device
from tasks.discover import affinity_torch, fiedler, fiedler_batch


def scene_features(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Patch features of a square grid with a rectangular object and noise."""
    side = int(round(np.sqrt(n)))
    fg = np.zeros((side, side), dtype=bool)
    fg[side // 4 : side // 2, side // 3 : 2 * side // 3] = True
    base = rng.normal(size=(2, dim))
    return np.where(fg.reshape(-1, 1), base[1], base[0]) + rng.normal(0, 1.0, (side * side, dim))


def dense_generalized(a: np.ndarray) -> np.ndarray:
    """MaskCut's solve: scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])."""
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    x = vecs[:, 0]
    return -x if x[np.argmax(np.abs(x))] < 0 else x


def iou(x: np.ndarray, y: np.ndarray) -> float:
    a, b = x > x.mean(), y > y.mean()
    return float((a & b).sum() / max((a | b).sum(), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3600)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=5, help="batches of graphs")
    p.add_argument("--batch", type=int, default=8, help="graphs a batch (the torch solver solves them together)")
    p.add_argument("--device", default="auto", help="the torch solver's device (auto: cuda when there is one)")
    args = p.parse_args()
    device = resolve_device(args.device)
    rng = np.random.default_rng(0)

    def graphs() -> list[torch.Tensor]:
        return [affinity_torch(scene_features(args.nodes, args.dim, rng), args.tau, 1e-5, device)
                for _ in range(args.batch)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = graphs()[:2]  # first calls (library set-up), untimed: a stage runs thousands
    dense_generalized(warm[0].cpu().numpy()), fiedler(warm[0].cpu().numpy()), fiedler_batch(warm)
    dense_t, scipy_t, torch_t, ious = [], [], [], {"scipy": [], "torch": []}
    for _ in range(args.repeats):
        batch = graphs()  # shared by the three solvers
        host = [g.cpu().numpy() for g in batch]
        t0 = time.perf_counter()
        xd = [dense_generalized(g) for g in host]
        t1 = time.perf_counter()
        xs = [fiedler(g)[0] for g in host]
        t2 = time.perf_counter()
        sync()
        t3 = time.perf_counter()
        xt = [x for x, _ in fiedler_batch(batch)]
        sync()
        t4 = time.perf_counter()
        dense_t.append((t1 - t0) / args.batch)
        scipy_t.append((t2 - t1) / args.batch)
        torch_t.append((t4 - t3) / args.batch)
        ious["scipy"] += [iou(a, b) for a, b in zip(xd, xs)]
        ious["torch"] += [iou(a, b) for a, b in zip(xd, xt)]
    d, f, t = np.median(dense_t), np.median(scipy_t), np.median(torch_t)
    print(f"nodes {args.nodes}, dim {args.dim}, tau {args.tau}, {args.repeats} batches of {args.batch} graphs, "
          f"torch on {device.type} ({torch.get_num_threads()} threads)")
    print(f"dense generalized scipy.linalg.eigh      {d * 1000:8.1f} ms a graph")
    print(f"solver scipy (deflated eigsh, one by one) {f * 1000:8.1f} ms a graph  {d / f:6.1f}x dense  "
          f"IoU min {min(ious['scipy']):.4f}")
    print(f"solver torch (batched Lanczos)            {t * 1000:8.1f} ms a graph  {d / t:6.1f}x dense  "
          f"IoU min {min(ious['torch']):.4f}  ({f / t:.2f}x scipy)")
    print("targets: >= 50x dense, bipartition IoU >= 0.99")


if __name__ == "__main__":
    main()
