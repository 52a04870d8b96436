"""Which patch features make the best discovery backbone on the toy world?

TokenCut on the toy test split (CorLoc, IoU >= 0.5) with features from:
the toy encoder (random weights and trained: last-block keys), and the toy
diffusion UNet's own activations at a small noise level (DDAE-style), from
several blocks and resolutions.  All measured in one run:

    .venv/bin/python benchmarks/discovery_backbones.py --n 300

With `--concepts data/concepts` (stage concepts' output), the matched units
only (`features.patch_backbone: concepts:SIDES:GRID`): the maps of the trained
best-buddy pairs' units (generator, encoder or both), each z-scored, on a grid
of 8 or 32, against the configured backbone, each beside its random-weight
baseline, on the test and the ood split (CorLoc and class-agnostic AP50 of
the one box per image):

    .venv/bin/python benchmarks/discovery_backbones.py --concepts data/concepts --taus 0.8
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mirage.data.images import decode_png
from mirage.models.encoders import load_encoder
from mirage.models.patch_backbones import load_patch_backbone, load_toy_pipeline
from mirage.data.store import read_table
from tasks.discover import cut_to_object, tokencut
from tasks.evaluate import corloc


def encoder_keys(name: str, images: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    enc = load_encoder(name, torch.device("cpu"))
    with torch.inference_mode():
        _, keys = enc.encode_images(images)
    return keys.numpy(), enc.patch_grid


def unet_features(pipe, images: np.ndarray, block: str, t: int, seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Activations of one UNet block for x_t = noised images at timestep t, no class."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    kind, _, idx = block.partition(".")
    module = unet.mid_block if kind == "mid" else getattr(unet, f"{kind}_blocks")[int(idx)]
    captured = []

    def hook(_m, _i, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    handle = module.register_forward_hook(hook)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ts = torch.full((len(x0),), t, dtype=torch.long)
    with torch.inference_mode():
        unet(sched.add_noise(x0, noise, ts), ts, class_labels=torch.full((len(x0),), pipe.null_class)).sample
    handle.remove()
    f = captured[0]
    b, c, h, w = f.shape
    return f.permute(0, 2, 3, 1).reshape(b, h * w, c).numpy(), (h, w)


def score(feats: np.ndarray, grid, images, gt, tau: float) -> float:
    h, w = images.shape[1:3]
    boxes = [cut_to_object(tokencut(f, grid, tau, 1e-5), h, w)[1] for f in feats]
    return corloc(boxes, gt, 0.5)


def scores(feats: np.ndarray, grid, images, gt, tau: float) -> tuple[float, float]:
    """CorLoc and class-agnostic AP50 of TokenCut's box (scored 1 - its eigenvalue)."""
    from tasks.evaluate import coco_detection

    h, w = images.shape[1:3]
    cuts = [tokencut(f, grid, tau, 1e-5) for f in feats]
    boxes = [cut_to_object(c, h, w)[1] for c in cuts]
    dets = [{"boxes": np.array([b]), "scores": np.array([1 - c.eigenvalue])} for b, c in zip(boxes, cuts)]
    return corloc(boxes, gt, 0.5), coco_detection(gt, dets, (h, w))[0]["AP50"]


def concepts_table(args) -> None:
    splits = {}
    for split in ("test", "ood"):
        rows = read_table(f"data/toyworld/{split}", columns=["image", "objects"]).to_pylist()[: args.n]
        splits[split] = (np.stack([decode_png(r["image"]) for r in rows]), [[o["box"] for o in r["objects"]] for r in rows])
    tau = float(args.taus.split(",")[0])
    from mirage.data.params import load

    spec = load("params.yaml").features.patch_backbone
    encoder = load_encoder(f"local-dir:{args.encoder}", torch.device("cpu"))
    specs = [spec, "encoder:keys"] + [f"concepts:{sides}:{grid}" for sides in ("both", "generator", "encoder") for grid in (8, 32)]
    candidates = {}
    for s in dict.fromkeys(specs):
        for random in (False, True):  # the learned backbone and its random-weight baseline (concepts: the twins' pairs)
            backbone = load_patch_backbone(s, encoder, args.generator, random_seed=0 if random else None,
                                           concepts=args.concepts)
            label = f"{s}{' (features.patch_backbone)' if s == spec else ''}{', random weights' if random else ''}"
            candidates[label] = backbone.patches
    print(f"TokenCut at tau {tau} on {args.n} scenes a split: CorLoc / AP50 (class-agnostic)")
    print(f"{'features':<64}{'grid x channels':>16}{'test':>16}{'ood':>16}")
    for name, make in candidates.items():
        cells = []
        for split, (images, gt) in splits.items():
            feats, grid = make(images)
            cells.append("{:.3f} / {:.3f}".format(*scores(feats, grid, images, gt, tau)))
        print(f"{name:<64}{f'{grid[0]}x{grid[1]} x {feats.shape[-1]}':>16}" + "".join(f"{c:>16}" for c in cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--test", default="data/toyworld/test")
    p.add_argument("--encoder", default="models/encoder")
    p.add_argument("--generator", default="models/generator")
    p.add_argument("--taus", default="0.0,0.2,0.3,0.5")
    p.add_argument("--concepts", default=None, help="stage concepts' output: compare the matched units as a backbone")
    args = p.parse_args()
    if args.concepts:
        return concepts_table(args)
    rows = read_table(args.test, columns=["image", "objects"]).to_pylist()[: args.n]
    images = np.stack([decode_png(r["image"]) for r in rows])
    gt = [[o["box"] for o in r["objects"]] for r in rows]
    taus = [float(t) for t in args.taus.split(",")]
    candidates = {
        "encoder random (keys, 8x8)": lambda: encoder_keys("random:mirage-toy-clip:0", images),
        "encoder trained (keys, 8x8)": lambda: encoder_keys(f"local-dir:{args.encoder}", images),
    }
    pipe = load_toy_pipeline(args.generator, torch.device("cpu"))
    for block in ("down.0", "down.1", "mid", "up.0", "up.1"):
        for t in (10, 100):
            candidates[f"unet {block} t={t}"] = lambda b=block, t=t: unet_features(pipe, images, b, t)
    print(f"TokenCut CorLoc on {len(rows)} toy test images; columns: tau")
    print(f"{'features':<32}{'grid':>7}" + "".join(f"{t:>8.2f}" for t in taus) + f"{'s/img':>8}")
    for name, make in candidates.items():
        start = time.perf_counter()
        feats, grid = make()
        results = [score(feats, grid, images, gt, t) for t in taus]
        per_img = (time.perf_counter() - start) / len(rows) / len(taus)
        print(f"{name:<32}{f'{grid[0]}x{grid[1]}':>7}" + "".join(f"{r:>8.3f}" for r in results) + f"{per_img:>8.4f}")


if __name__ == "__main__":
    main()
