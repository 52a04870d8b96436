"""Normalized cut at MaskCut's size: dense generalized eigh vs mirage's solvers.

MaskCut solves (D - A) x = lambda D x densely (scipy.linalg.eigh with b=D) on
3600 patches (ViT-B/8 at 480 px).  mirage solves the symmetric normalized
problem with ARPACK (eigsh, `discover.solver: scipy`, one image at a time) or
with batched Lanczos in torch (`discover.solver: torch`, a batch of images
together, on the GPU when there is one).  Same affinity, same bipartition
rule; this prints each solver's time per graph, their ratios to the dense
solve (the affinity matrices are built once, for all) and the IoU of their
bipartitions to the dense one's.  With --toy-scenes N: both solvers in the
discover stage's own path (discover_images, TokenCut and MaskCut) on the
configured patch backbone's features of N toy test scenes (the project's
params.yaml and data/toyworld/test): img/s, images whose masks are the same,
CorLoc of each.

    .venv/bin/python benchmarks/ncut_speed.py --nodes 3600 --repeats 5 --batch 8
    .venv/bin/python benchmarks/ncut_speed.py --repeats 0 --toy-scenes 300
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg
import torch

from _common import ROOT, sync

from mirage.models.devices import resolve_device
from tasks.discover import affinity_torch, fiedler, fiedler_batch, mirrored


def scene_features(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Patch features of a square grid with a rectangular object and noise."""
    side = int(round(np.sqrt(n)))
    fg = np.zeros((side, side), dtype=bool)
    fg[side // 4 : side // 2, side // 3 : 2 * side // 3] = True
    base = rng.normal(size=(2, dim))
    return np.where(fg.reshape(-1, 1), base[1], base[0]) + rng.normal(0, 1.0, (side * side, dim))


def dense_generalized(a: np.ndarray) -> np.ndarray:
    """MaskCut's solve: scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])."""
    a = mirrored(a)  # the whole matrix (mirage's CPU graphs store their lower triangle)
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    x = vecs[:, 0]
    return -x if x[np.argmax(np.abs(x))] < 0 else x


def iou(x: np.ndarray, y: np.ndarray) -> float:
    a, b = x > x.mean(), y > y.mean()
    return float((a & b).sum() / max((a | b).sum(), 1))


def toy_scenes(n: int, device: torch.device) -> None:
    """Both solvers on the toy test scenes' patch features, as the stage cuts them."""
    from mirage.data.params import load
    from mirage.models.encoders import load_encoder
    from mirage.models.fingerprint import encoder_spec
    from mirage.models.patch_backbones import load_patch_backbone
    from tasks.discover import cut_to_object, discover_images
    from tasks.evaluate import corloc, load_test_split

    p = load(ROOT / "params.yaml")
    gt = load_test_split(str(ROOT / "data/toyworld/test"), list(p.discover.classes))
    encoder = load_encoder(encoder_spec(p.features.encoder), device, p.features.dtype)
    backbone = load_patch_backbone(p.features.patch_backbone, encoder, p.generate.model)
    images = gt["images"][:n]
    batches = [backbone.patches(images[i : i + 32]) for i in range(0, len(images), 32)]
    patches, grid = np.concatenate([f for f, _ in batches]), batches[0][1]
    size = images.shape[1:3]
    print(f"\n{len(images)} toy test scenes, {p.features.patch_backbone} ({grid[0]}x{grid[1]} patches x "
          f"{patches.shape[2]}), tau {p.discover.tau}, batches of 32 as the stage cuts them")
    for method in ("tokencut", "maskcut"):
        found, rates = {}, {}
        for solver in ("scipy", "torch"):
            cfg = p.discover.model_copy(update={"method": method, "solver": solver})
            discover_images(list(patches[:2]), grid, cfg, device)  # first calls, untimed
            start = time.perf_counter()
            found[solver] = [c for i in range(0, len(patches), 32)
                             for c in discover_images(list(patches[i : i + 32]), grid, cfg, device)]
            rates[solver] = len(patches) / (time.perf_counter() - start)
        same = sum(len(a) == len(b) and all(np.array_equal(x.patch_mask, y.patch_mask) for x, y in zip(a, b))
                   for a, b in zip(found["scipy"], found["torch"]))
        hits = {k: corloc([cut_to_object(c[0], *size)[1] if c else [0.0] * 4 for c in v], gt["boxes"][: len(v)])
                for k, v in found.items()}
        print(f"{method:<9} scipy {rates['scipy']:6.1f} img/s  torch {rates['torch']:6.1f} img/s  "
              f"same masks {same} of {len(patches)}  CorLoc scipy {hits['scipy']:.3f} torch {hits['torch']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3600)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--repeats", type=int, default=5, help="batches of graphs")
    p.add_argument("--batch", type=int, default=8, help="graphs a batch (the torch solver solves them together)")
    p.add_argument("--device", default="auto", help="the torch solver's device (auto: cuda when there is one)")
    p.add_argument("--toy-scenes", type=int, default=0, help="also both solvers on N toy test scenes' features")
    args = p.parse_args()
    device = resolve_device(args.device)
    if args.repeats == 0:
        toy_scenes(args.toy_scenes, device)
        return
    rng = np.random.default_rng(0)

    def graphs() -> list[torch.Tensor]:
        return [affinity_torch(scene_features(args.nodes, args.dim, rng), args.tau, 1e-5, device)
                for _ in range(args.batch)]

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
        sync(device)
        t3 = time.perf_counter()
        xt = [x for x, _ in fiedler_batch(batch)]
        sync(device)
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
    if args.toy_scenes:
        toy_scenes(args.toy_scenes, device)


if __name__ == "__main__":
    main()
