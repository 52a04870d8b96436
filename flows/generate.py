"""Stage generate: sample images for every class prompt into Parquet shards."""
from __future__ import annotations

import sys
import time

import pyarrow as pa
from prefect import flow, get_run_logger, task

from mirage import schema
from mirage.fingerprint import model_fingerprint
from mirage.images import encode_png
from mirage.models import load_generator
from mirage.params import Generate
from mirage.stage import parse, progress
from mirage.store import ShardStore, item_key
from tasks.generate import GenerationItem, generate_batch, item_seed

VERSION = 1  # bump when sampling changes: it is part of every image's key


def wanted_items(cfg: Generate, model_id: str) -> list[GenerationItem]:
    items = []
    for class_name in cfg.classes:
        prompt = cfg.prompt_template.format(class_name)
        for i in range(cfg.per_class):
            seed = item_seed(cfg.seed, class_name, i)
            key = item_key("generate", VERSION, model_id, prompt, class_name, seed, cfg.steps, cfg.guidance)
            items.append(GenerationItem(key, prompt, class_name, seed))
    return items


@task
def sample(pipe, model_id: str, cfg: Generate, items: list[GenerationItem]) -> pa.Table:
    images = generate_batch(pipe, items, cfg.steps, cfg.guidance)
    rows = [
        {"key": it.key, "id": f"g-{it.key[:16]}", "image": encode_png(img), "width": img.shape[1],
         "height": img.shape[0], "prompt": it.prompt, "class_name": it.class_name, "seed": it.seed,
         "model": model_id, "steps": cfg.steps, "guidance": cfg.guidance}
        for it, img in zip(items, images)
    ]
    return pa.Table.from_pylist(rows, schema=schema.IMAGES)


@flow(name="generate")
def generate_flow(cfg: Generate, model: str, out: str) -> dict[str, int]:
    log = get_run_logger()
    model_id = model_fingerprint(model)
    pipe = load_generator(model)
    unknown = [c for c in cfg.classes if c not in pipe.config.class_names]
    if unknown:
        raise ValueError(f"generate.classes: {unknown} not known to generator {model} ({pipe.config.class_names})")
    items = wanted_items(cfg, model_id)
    store = ShardStore(out, schema.IMAGES, {"stage": "generate", "model": model_id, "params": cfg.digest()}, cfg.shard_rows)
    start = time.perf_counter()
    with progress(len(items), "generate") as bar:
        stats = store.update([(it.key, it) for it in items], lambda batch: sample(pipe, model_id, cfg, batch),
                             cfg.batch_size, bar.update)
    rate = stats.computed / max(time.perf_counter() - start, 1e-9)
    log.info("generate: %d images (%d new at %.1f img/s, %d reused, %d dropped)",
             stats.wanted, stats.computed, rate, stats.reused, stats.dropped)
    return {"images": stats.wanted, "computed": stats.computed}


def main(argv: list[str] | None = None) -> None:
    params, args = parse("generate", ["model", "out"], argv)
    generate_flow(params.generate, args.model, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
