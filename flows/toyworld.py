"""Stage toyworld: render the train, test (and ood) splits as Parquet, and the
unlabeled split as a folder of PNG files (the default `sources.images`)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data import schema
from mirage.data.params import Toyworld
from mirage.data.store import ShardStore, atomic_write_bytes
from mirage.run.stage import command, parse, progress
from tasks.toyworld import check_names, render_batch, scene_key, unlabeled_images


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
            stats = store.update(wanted, lambda specs: render_batch(cfg, split, specs), batch_size=256, progress=bar.update,
                                 on_plan=bar.plan)
        log.info("toyworld %s: %d scenes (%d rendered, %d reused)", name, stats.wanted, stats.computed, stats.reused)
        counts[name] = {"items": stats.wanted, "computed": stats.computed}
    counts["unlabeled"] = write_unlabeled(cfg, Path(out) / "unlabeled")
    log.info("toyworld unlabeled: %d PNG files (%d written)", counts["unlabeled"]["items"],
             counts["unlabeled"]["computed"])
    return counts


UNLABELED_README = "README.txt"  # not an image: the import stage's folder scan skips it
UNLABELED_TEXT = ("Unlabeled scenes of the toy world (params toyworld.unlabeled), written by stage toyworld:\n"
                  "the default sources.images of the toy profile. Their objects are not written anywhere.\n")


def write_unlabeled(cfg: Toyworld, folder: Path) -> dict[str, int]:
    """The unlabeled split's PNG files in `folder` (made even when the split is
    null: stage import depends on it): files whose bytes are already right are
    left alone (their times too, so the import stage's scan sees no change),
    others written atomically, files of no scene removed."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = unlabeled_images(cfg, cfg.unlabeled) if cfg.unlabeled else {}
    # DVC tracks files, not folders: without one, an empty folder is gone after a checkout (`dvc exp run`)
    readme = folder / UNLABELED_README
    if not readme.exists() or readme.read_text() != UNLABELED_TEXT:
        atomic_write_bytes(readme, UNLABELED_TEXT.encode())
    written = 0
    for name, data in wanted.items():
        path = folder / name
        if not path.exists() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
            written += 1
    for path in folder.iterdir():
        if path.name not in wanted and path.name != UNLABELED_README:
            path.unlink()
    return {"items": len(wanted), "computed": written}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("toyworld", ["out"], argv)
    return toyworld_flow(params.toyworld, args.out)


if __name__ == "__main__":
    command(main)
