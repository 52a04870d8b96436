"""Stage generate: sample images for every (template, class) prompt into Parquet shards."""
from __future__ import annotations

import sys
import time

import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.fingerprint import model_fingerprint
from mirage.generators import GenerationItem, Generator, load_generator
from mirage.images import encode_png
from mirage.params import Generate
from mirage.stage import parse, pool_dir, progress
from mirage.store import ShardStore
from tasks.generate import plan


def sample(gen: Generator, model_id: str, cfg: Generate, size: int | None, items: list[GenerationItem]) -> pa.Table:
    images = gen.sample(items, cfg.steps, cfg.guidance, size, pad_to=cfg.batch_size)
    rows = [
        {"key": it.key, "id": f"g-{it.key[:16]}", "image": encode_png(img), "width": img.shape[1],
         "height": img.shape[0], "prompt": it.prompt, "class_name": it.class_name, "seed": it.seed,
         "model": model_id, "steps": cfg.steps, "guidance": cfg.guidance}
        for it, img in zip(items, images)
    ]
    return pa.Table.from_pylist(rows, schema=schema.IMAGES)


def image_size(cfg: Generate, gen: Generator) -> int | None:
    native = gen.native_size()
    if native and cfg.image_size and cfg.image_size != native:
        raise ValueError(f"generate.image_size: {cfg.image_size}, but {cfg.model} only makes {native} px images")
    return cfg.image_size or native


@flow(name="generate")
def generate_flow(cfg: Generate, out: str) -> dict[str, int]:
    log = get_run_logger()
    gen = load_generator(cfg.model, cfg.device, cfg.dtype)
    model_id = model_fingerprint(cfg.model)  # after loading: a hub model's revision is then in the local cache
    gen.check_classes(cfg.classes)
    size = image_size(cfg, gen)
    dtype = str(gen.dtype).removeprefix("torch.")
    items = plan(cfg.prompt_templates, cfg.classes, cfg.per_prompt, cfg.seed,
                 (model_id, cfg.steps, cfg.guidance, size, dtype, cfg.batch_size))
    meta = {"stage": "generate", "model": model_id, "params": cfg.digest(), "device": str(gen.device), "dtype": dtype}
    store = ShardStore(out, schema.IMAGES, meta, cfg.shard_rows, pool=pool_dir("generate"),
                       row_bytes=(size or 512) ** 2 * 3 // 2)  # a generous PNG size estimate
    start = time.perf_counter()
    with progress(len(items), "generate", unit="img") as bar:
        stats = store.update([(it.key, it) for it in items], lambda batch: sample(gen, model_id, cfg, size, batch),
                             cfg.batch_size, bar.update)
    rate = stats.computed / max(time.perf_counter() - start, 1e-9)
    log.info("generate: %d images (%d new at %.2f img/s on %s/%s, %d reused, %d dropped)",
             stats.wanted, stats.computed, rate, gen.device, dtype, stats.reused, stats.dropped)
    return {"images": stats.wanted, "items": stats.wanted, "computed": stats.computed, "reused": stats.reused,
            "rate": round(rate, 3)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("generate", ["out"], argv)
    return generate_flow(params.generate, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
