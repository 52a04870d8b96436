"""Stage generate: sample images for every (template, class) prompt into Parquet shards."""
from __future__ import annotations

import time

from prefect import flow, get_run_logger

from mirage.data import schema
from mirage.data.params import Generate, Runner
from mirage.data.store import ShardStore
from mirage.run.runner import open_runner
from mirage.run.stage import command, parse, pool_dir, progress
from tasks.generate import GenerateJob, plan


@flow(name="generate")
def generate_flow(cfg: Generate, out: str, runner: Runner = Runner()) -> dict[str, int]:
    log = get_run_logger()
    with open_runner(runner, "generate") as run:
        facts = run.describe(GenerateJob(cfg))
        model_id, size, dtype = facts["model"], facts["size"], facts["dtype"]
        job = GenerateJob(cfg, model_id, size)
        items = plan(cfg.prompt_templates, cfg.classes, cfg.per_prompt, cfg.seed,
                     (model_id, cfg.steps, cfg.guidance, size, dtype, cfg.batch_size,
                      *([("tome", cfg.tome_ratio)] if cfg.tome_ratio else [])))
        meta = {"stage": "generate", "model": model_id, "params": cfg.digest(), "device": facts["device"],
                "dtype": dtype}
        store = ShardStore(out, schema.IMAGES, meta, cfg.shard_rows, pool=pool_dir("generate"),
                           row_bytes=(size or 512) ** 2 * 3 // 2)  # a generous PNG size estimate
        start = time.perf_counter()
        with progress(len(items), "generate", unit="img") as bar:
            stats = store.update([(it.key, it) for it in items], None, cfg.batch_size, bar.update, on_plan=bar.plan,
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
