"""A run after adding 10% items vs a from-scratch run, side by side.

For the generate stage (the toy pipeline of params.yaml, more images per
prompt) and the features stage (the toy encoder + UNet patches, more images):
scratch = the stage on N + 10% items into an empty output; incremental = the
stage on N + 10% items where N are already there.  Both include the model
load and the flow start, which is what a nightly re-run pays.
Target (issue 4): incremental / scratch <= 0.15.

    .venv/bin/python benchmarks/incremental.py --per-prompt 100
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import ROOT, images_table, prefect_server, project_params, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=100, help="generate: images per prompt before adding 10%")
    parser.add_argument("--features-n", type=int, default=2000, help="features: images before adding 10%")
    parser.add_argument("--stages", nargs="+", default=["generate", "features"], choices=["generate", "features"])
    args = parser.parse_args()
    p = project_params()
    tmp = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    try:
        with prefect_server():
            if "generate" in args.stages:
                bench_generate(p, args.per_prompt, tmp)
            if "features" in args.stages:
                bench_features(p, args.features_n, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_generate(p, per_prompt: int, tmp: Path) -> None:
    from flows.generate import generate_flow

    gen = p.generate.model_copy(update={"model": str(ROOT / "models" / "generator")})
    more = gen.model_copy(update={"per_prompt": per_prompt + per_prompt // 10})
    base = gen.model_copy(update={"per_prompt": per_prompt})
    generate_flow(base.model_copy(update={"per_prompt": 1}), str(tmp / "warm"))  # imports, first flow
    scratch_s, s_out = timed(generate_flow, more, str(tmp / "scratch"))
    generate_flow(base, str(tmp / "incremental"))
    incr_s, i_out = timed(generate_flow, more, str(tmp / "incremental"))
    assert i_out["computed"] == s_out["images"] - base.per_prompt * len(base.classes), i_out
    report("generate", s_out["images"], i_out["computed"], scratch_s, incr_s)


def bench_features(p, n: int, tmp: Path) -> None:
    from flows.features import features_flow

    extra = n // 10
    images = images_table(tmp / "images", n + extra, p.toyworld.image_size)
    first = images_table(tmp / "images-first", n, p.toyworld.image_size)  # the same first n images
    feats = p.features.model_copy(update={"encoder": str(ROOT / "models" / "encoder")})
    unet = str(ROOT / "models" / "generator")
    few = images_table(tmp / "few", 8, p.toyworld.image_size, seed=1)
    features_flow(feats, str(few), unet, str(tmp / "f-warm"))  # imports, first flow
    scratch_s, s_out = timed(features_flow, feats, str(images), unet, str(tmp / "f-scratch"))
    features_flow(feats, str(first), unet, str(tmp / "f-incremental"))
    incr_s, i_out = timed(features_flow, feats, str(images), unet, str(tmp / "f-incremental"))
    assert i_out["computed"] == extra, i_out
    report("features", n + extra, extra, scratch_s, incr_s)


def report(stage: str, total: int, new: int, scratch_s: float, incr_s: float) -> None:
    print(f"{stage}: {total} items; scratch {scratch_s:.2f} s, after adding {new} items {incr_s:.2f} s")
    print(f"  ratio incremental/scratch = {incr_s / scratch_s:.3f}  (target <= 0.15)")


if __name__ == "__main__":
    main()
