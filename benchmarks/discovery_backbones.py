"""Which patch features make the best discovery backbone on the toy world?

TokenCut on the toy test split (CorLoc, IoU >= 0.5) with features from:
the toy encoder (random weights and trained: last-block keys), and the toy
diffusion UNet's own activations at a small noise level (DDAE-style), from
several blocks and resolutions.  All measured in one run:

    .venv/bin/python benchmarks/discovery_backbones.py --n 300
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mirage.data.images import decode_png
from mirage.models.encoders import load_encoder, load_toy_pipeline
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--test", default="data/toyworld/test")
    p.add_argument("--encoder", default="models/encoder")
    p.add_argument("--generator", default="models/generator")
    p.add_argument("--taus", default="0.0,0.2,0.3,0.5")
    args = p.parse_args()
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
