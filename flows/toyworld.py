"""Stage toyworld: render the train, test (and ood) splits as Parquet."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger

from mirage import schema
from mirage.images import encode_mask, encode_png, mask_to_box
from mirage.params import Split, Toyworld
from mirage.stage import command, parse, progress
from mirage.store import ShardStore, item_key
from tasks.toyworld import check_names, render_scene

VERSION = 1  # bump when rendering changes: it is part of every scene's key


def scene_key(cfg: Toyworld, split: Split, index: int) -> str:
    # `n` is left out on purpose: growing a split keeps the scenes it had.
    other = {k: v for k, v in split.spec().items() if k in ("shapes", "textures")}  # only where set: old keys hold
    return item_key("toyworld", VERSION, cfg.image_size, cfg.classes, cfg.colors, cfg.object_size,
                    split.seed, split.min_objects, split.max_objects, index, *([other] if other else []))


def render_batch(cfg: Toyworld, split: Split, specs: list[tuple[str, int]]) -> pa.Table:
    rows = []
    for key, index in specs:
        scene = render_scene(cfg, split, index)
        objects = [
            {"class_name": o.class_name, "color": o.color, "box": mask_to_box(o.mask), "mask": encode_mask(o.mask)}
            for o in scene.objects
        ]
        rows.append({
            "key": key, "id": f"s{split.seed}-{index:06d}", "image": encode_png(scene.image),
            "width": cfg.image_size, "height": cfg.image_size, "caption": scene.caption,
            "seed": index, "objects": objects,
        })
    return pa.Table.from_pylist(rows, schema=schema.SCENES)


@flow(name="toyworld")
def toyworld_flow(cfg: Toyworld, out: str) -> dict[str, dict[str, int]]:
    log = get_run_logger()
    check_names(cfg)
    counts = {}
    for name in ("train", "test", "ood"):
        split = getattr(cfg, name)  # no ood split: an empty table (evaluate then reports no ood metrics)
        store = ShardStore(Path(out) / name, schema.SCENES, {"stage": "toyworld", "split": name, "params": cfg.split_digest(name)}, cfg.shard_rows)
        wanted = [(k, (k, i)) for i in range(split.n) for k in [scene_key(cfg, split, i)]] if split else []
        with progress(len(wanted), f"toyworld {name}") as bar:
            stats = store.update(wanted, lambda specs: render_batch(cfg, split, specs), batch_size=256, progress=bar.update)
        log.info("toyworld %s: %d scenes (%d rendered, %d reused)", name, stats.wanted, stats.computed, stats.reused)
        counts[name] = {"items": stats.wanted, "computed": stats.computed}
    return counts


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("toyworld", ["out"], argv)
    return toyworld_flow(params.toyworld, args.out)


if __name__ == "__main__":
    command(main)
