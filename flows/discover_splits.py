"""Stage discover_splits: TokenCut and MaskCut on the test and ood scenes, and
the random-weight baseline, as the table evaluate scores (tasks/discover_splits.py)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data.params import Params
from mirage.data.store import read_table, write_parquet
from mirage.run.runner import open_runner
from mirage.run.stage import command, parse, progress
from tasks.discover_splits import discover_splits, methods_of, split_images


@flow(name="discover_splits")
def discover_splits_flow(params: Params, test: str, out: str, ood: str | None = None,
                         concepts: str | None = None) -> dict:
    """The teacher's boxes on `test` and (when it holds scenes) `ood`, into
    the Parquet file `out`; `concepts`: stage concepts' output (a `concepts`
    patch backbone's units)."""
    splits = {"test": split_images(test)}
    if ood and read_table(ood, columns=["key"]).num_rows:
        splits["ood"] = split_images(ood)
    total = sum(len(images) for images in splits.values()) + len(splits["test"])  # + the random-weight baseline
    with open_runner(params.runner, "discover_splits") as run, progress(total, "discover_splits", "img") as bar:
        table = discover_splits(params, run, splits, concepts, bar.update)  # on Dask workers with kind dask
    write_parquet(Path(out), table)
    counts = {name: len(images) for name, images in splits.items()}
    get_run_logger().info("discover_splits: %s cut on %s (%s), and the test split with random weights",
                          ", ".join(methods_of(params.discover)), counts, params.features.patch_backbone)
    return {"images": counts, "rows": table.num_rows}


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts)."""
    params, args = parse("discover_splits", ["test", "ood", "concepts", "out"], argv)
    return discover_splits_flow(params, args.test, args.out, args.ood, args.concepts)


if __name__ == "__main__":
    command(main)
