"""Stage generate: sample images for every (template, class) prompt into Parquet shards."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.fingerprint import model_fingerprint
from mirage.generators import GenerationItem, Generator, load_generator
from mirage.images import encode_png
from mirage.params import Generate, Runner
from mirage.runner import open_runner
from mirage.stage import command, parse, pool_dir, progress
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


@dataclass(frozen=True)
class GenerateJob:
    """The generator's batches, wherever they run (mirage/runner.py)."""

    cfg: Generate
    model_id: str = ""  # from describe(): filled in before batches are sent
    size: int | None = None

    @property
    def batch_param(self) -> tuple[str, int]:
        """The key that sizes a batch (named when one runs out of memory)."""
        return "generate.batch_size", self.cfg.batch_size

    def load_key(self) -> tuple:
        return ("generate", self.cfg.model, self.cfg.device, self.cfg.dtype)

    def load(self) -> Generator:
        return load_generator(self.cfg.model, self.cfg.device, self.cfg.dtype)

    def describe(self, gen: Generator) -> dict:
        gen.check_classes(self.cfg.classes)
        return {"model": model_fingerprint(self.cfg.model),  # after loading: a hub model's revision is then cached
                "size": image_size(self.cfg, gen), "device": str(gen.device),
                "dtype": str(gen.dtype).removeprefix("torch.")}

    def prepare(self, gen: Generator, items: list[GenerationItem]) -> list[GenerationItem]:
        return items

    def compute(self, gen: Generator, items: list[GenerationItem]) -> pa.Table:
        return sample(gen, self.model_id, self.cfg, self.size, items)


@flow(name="generate")
def generate_flow(cfg: Generate, out: str, runner: Runner = Runner()) -> dict[str, int]:
    log = get_run_logger()
    with open_runner(runner, "generate") as run:
        facts = run.describe(GenerateJob(cfg))
        model_id, size, dtype = facts["model"], facts["size"], facts["dtype"]
        job = GenerateJob(cfg, model_id, size)
        items = plan(cfg.prompt_templates, cfg.classes, cfg.per_prompt, cfg.seed,
                     (model_id, cfg.steps, cfg.guidance, size, dtype, cfg.batch_size))
        meta = {"stage": "generate", "model": model_id, "params": cfg.digest(), "device": facts["device"],
                "dtype": dtype}
        store = ShardStore(out, schema.IMAGES, meta, cfg.shard_rows, pool=pool_dir("generate"),
                           row_bytes=(size or 512) ** 2 * 3 // 2)  # a generous PNG size estimate
        start = time.perf_counter()
        with progress(len(items), "generate", unit="img") as bar:
            stats = store.update([(it.key, it) for it in items], None, cfg.batch_size, bar.update,
                                 run=lambda batches: run.map(job, batches))
    rate = stats.computed / max(time.perf_counter() - start, 1e-9)
    log.info("generate: %d images (%d new at %.2f img/s on %s/%s, %s runner, %d model load(s), %d reused, %d dropped)",
             stats.wanted, stats.computed, rate, facts["device"], dtype, run.kind, len(run.loads), stats.reused,
             stats.dropped)
    return {"images": stats.wanted, "items": stats.wanted, "computed": stats.computed, "reused": stats.reused,
            "rate": round(rate, 3), "model_loads": len(run.loads)}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("generate", ["out"], argv)
    return generate_flow(params.generate, args.out, params.runner)


if __name__ == "__main__":
    command(main)
