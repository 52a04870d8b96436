"""Features stage throughput vs the bare model forward, side by side in one run.

Bare: the encoder's own forward (what the stage runs: open_clip's image
tower, autocast on a GPU, Token Merging at --tome-r) on the same batches,
already decoded and preprocessed in memory (the best any caching tool can do).
Stage: `flows.features` from PNGs in Parquet to a written features table
(reading, decoding in background threads, preprocessing, forward, Parquet,
manifest), timed as a whole, model loading included, and its compute loop
alone.  Target (issue 4): stage / bare >= 0.9.

    .venv/bin/python benchmarks/features_throughput.py --n 768 --batch 32 --repeats 2
    .venv/bin/python benchmarks/features_throughput.py --device cuda --arch ViT-L-14 --tome-r 8   # a GPU
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import images_table, prefect_server, project_params, sync, timed

from mirage import random_models
from mirage.models.devices import resolve_device
from mirage.models.encoders import load_encoder
from mirage.data.store import iter_rows
from tasks.features import decode_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="stored image size (px)")
    parser.add_argument("--workers", default="auto", help="decode workers: a number or auto (the stage's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="on a GPU: auto (float16 autocast) or float32")
    parser.add_argument("--tome-r", type=int, default=0, help="features.tome_r, in the stage and the bare forward alike")
    args = parser.parse_args()
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    try:
        model_dir = random_models.save_open_clip(args.arch, tmp / "encoder")
        images = images_table(tmp / "images", args.n, args.size)
        workers = args.workers if args.workers == "auto" else int(args.workers)
        cfg = project_params().features.model_copy(update={
            "encoder": str(model_dir), "batch_size": args.batch, "patches": False, "workers": workers,
            "device": args.device, "dtype": args.dtype, "tome_r": args.tome_r})

        encoder = load_encoder(f"local-dir:{model_dir}", device, args.dtype)
        rows = list(iter_rows(images, ["id", "image"]))
        batches = []
        for i in range(0, len(rows), args.batch):
            chunk = rows[i : i + args.batch]
            batches.append(encoder.prepare(decode_batch([r["id"] for r in chunk], [r["image"] for r in chunk], None)[0]))

        def bare() -> None:  # the stage's own forward (autocast on a GPU, merging at tome_r)
            with torch.inference_mode():
                for x in batches:
                    encoder.forward(x.to(device), None, args.tome_r)
                sync(device)

        from flows.features import features_flow

        bare()  # warm-up (allocator, kernels), untimed
        bare_t, stage_t, loop_rates = [], [], []
        with prefect_server():
            few = images_table(tmp / "few", 8, args.size, seed=1)
            features_flow(cfg, str(few), "unused", str(tmp / "warm"))  # warm-up: imports, first flow run
            for r in range(args.repeats):  # interleaved, so machine drift hits both alike
                bare_t.append(timed(bare)[0])
                seconds, out = timed(features_flow, cfg, str(images), "unused", str(tmp / f"features-{r}"))
                assert out["computed"] == args.n, out
                stage_t.append(seconds)
                loop_rates.append(out["rate"])
        bare_s, stage_s, loop_rate = float(np.median(bare_t)), float(np.median(stage_t)), float(np.median(loop_rates))
        bare_rate, stage_rate = args.n / bare_s, args.n / stage_s
        print(f"{args.arch} random weights, {device.type} ({torch.get_num_threads()} CPU threads, "
              f"{encoder.autocast_dtype or torch.float32}), tome_r {args.tome_r}, {args.n} images of "
              f"{args.size} px, batch {args.batch}, decode workers {args.workers}")
        print(f"medians of {args.repeats} interleaved repeats")
        print(f"bare forward on preprocessed batches      {bare_s:7.2f} s  {bare_rate:6.1f} img/s")
        print(f"features stage (PNG in Parquet -> table)   {stage_s:7.2f} s  {stage_rate:6.1f} img/s"
              "  (model load and flow start included)")
        print(f"  of which the compute loop (read, decode, forward, write) {args.n / loop_rate:7.2f} s  "
              f"{loop_rate:6.1f} img/s")
        print(f"ratio stage/bare throughput = {stage_rate / bare_rate:.3f}  (target >= 0.9); "
              f"loop/bare = {loop_rate / bare_rate:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
