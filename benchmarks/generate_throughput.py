"""Generate stage throughput vs the bare diffusers pipeline call, side by side.

Same model, same prompts and seeds, same batches: bare is the pipeline's own
`__call__` per batch with its output left in memory; the stage is
`flows.generate` (planning, per-item seeds, PNG encoding, Parquet shards,
manifest), timed as a whole, model loading included.  Two models: a
Stable-Diffusion-layout text-to-image pipeline with random weights (loaded
through AutoPipelineForText2Image) and the committed toy pipeline.
Target (issue 4): stage / bare >= 0.95.

    .venv/bin/python benchmarks/generate_throughput.py --n 24 --repeats 3
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, prefect_server, project_params, timed

from mirage import random_models
from mirage.models.fingerprint import model_fingerprint
from mirage.models.generators import load_generator
from tasks.generate import plan


def bare_call(gen, batches, cfg, size) -> None:
    """What a hand-written loop does: the pipeline per batch, nothing stored."""
    for items in batches:
        padded = items + [items[-1]] * (cfg.batch_size - len(items))
        generators = [torch.Generator().manual_seed(it.seed) for it in padded]
        if gen.kind == "toy":
            names = list(gen.pipe.config.class_names)
            gen.pipe([names.index(it.class_name) for it in padded], generators,
                     num_inference_steps=cfg.steps, guidance_scale=cfg.guidance)
        else:
            gen.pipe(prompt=[it.prompt for it in padded], generator=generators, num_inference_steps=cfg.steps,
                     guidance_scale=cfg.guidance, height=size, width=size, output_type="np")


def compare(name: str, cfg, tmp: Path, repeats: int) -> float:
    from flows.generate import generate_flow

    gen = load_generator(cfg.model, cfg.device, cfg.dtype)
    size = cfg.image_size or gen.native_size()
    dtype = str(gen.dtype).removeprefix("torch.")
    items = plan(cfg.prompt_templates, cfg.classes, cfg.per_prompt, cfg.seed,
                 (model_fingerprint(cfg.model), cfg.steps, cfg.guidance, size, dtype))
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    bare_call(gen, batches[:1], cfg, size)  # warm-up
    slug = name.split(" ")[0]
    generate_flow(cfg.model_copy(update={"per_prompt": 1}), str(tmp / f"{slug}-warm"))  # warm-up flow
    bare_t, stage_t, loop_rates = [], [], []
    for r in range(repeats):  # interleaved, so machine drift hits both alike
        bare_t.append(timed(bare_call, gen, batches, cfg, size)[0])
        seconds, out = timed(generate_flow, cfg, str(tmp / f"{slug}-{r}"))
        assert out["computed"] == len(items), out
        stage_t.append(seconds)
        loop_rates.append(out["rate"])
    bare_s, stage_s, loop = float(np.median(bare_t)), float(np.median(stage_t)), float(np.median(loop_rates))
    n = len(items)
    print(f"{name}: {n} images of {size} px, {cfg.steps} steps, batch {cfg.batch_size}, guidance {cfg.guidance}; "
          f"medians of {repeats} interleaved repeats")
    print(f"  bare pipeline call   {bare_s:7.2f} s  {n / bare_s:6.2f} img/s")
    print(f"  generate stage       {stage_s:7.2f} s  {n / stage_s:6.2f} img/s  (model load and flow start included)")
    print(f"    of which the sampling loop (sample, PNG, Parquet)  {loop:6.2f} img/s")
    ratio = bare_s / stage_s
    print(f"  ratio stage/bare throughput = {ratio:.3f}  (target >= 0.95); loop/bare = {loop * bare_s / n:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="images per model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mirage-bench-"))
    base = project_params().generate
    try:
        sd = random_models.save_text2image(tmp / "sd-layout", unet_channels=(64, 128, 128), vae_channels=(32, 64, 64),
                                           text_width=64, text_layers=2, sample_size=32)
        configs = {
            "text2image (SD layout, random weights)": base.model_copy(update={
                "model": str(sd), "prompt_templates": ("a photo of a {}",), "per_prompt": args.n // len(base.classes),
                "steps": 8, "guidance": 0.0, "image_size": 256, "batch_size": 8}),
            "toy pipeline (models/generator)": base.model_copy(update={
                "model": str(ROOT / "models" / "generator"), "per_prompt": args.n // len(base.classes),
                "batch_size": 16}),
        }
        with prefect_server():
            for name, cfg in configs.items():
                compare(name, cfg, tmp, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
