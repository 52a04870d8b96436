"""Stage evaluate: discovery CorLoc (learned vs random weights), detector AP per round, prompt alignment.

Every model comes from params.yaml (`features.encoder`, `features.patch_backbone`,
`generate.model`): the random-weight baseline is the configured backbone's own
architecture, and prompt alignment compares the configured encoder's image and
text embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data.params import Params
from mirage.data.store import atomic_write_bytes, atomic_write_json
from mirage.run.runner import open_runner
from mirage.run.stage import command, parse
from tasks.evaluate import evaluate, pr_csv


@flow(name="evaluate")
def evaluate_flow(params: Params, test: str, images: str, features: str, detector: str, metrics: str,
                  plots: str, ood: str | None = None, reference: str | None = None, real: str | None = None,
                  concepts: str | None = None) -> dict:
    """Metrics on the test split and, side by side, on the ood split (`ood`,
    when it holds scenes): TokenCut's and MaskCut's discovery, and the
    detector of every round (its pseudo-labels' teacher is discovery); `concepts`: stage
    concepts' output (its measures are reported here; a `concepts` patch backbone's units)."""
    with open_runner(params.runner, "evaluate") as run:  # the splits' discovery: on Dask workers with kind dask
        result, curves, grid_png, quality_png = evaluate(params, run, test, images, features, detector, ood,
                                                         reference, real, concepts)
    measures = Path(concepts) / "measures.json" if concepts else None
    if measures and measures.exists():  # stage concepts' measures (Rosetta Neurons), reported here
        result["concepts"] = json.loads(measures.read_text())
    atomic_write_json(Path(metrics), result)
    for r, curve in enumerate(curves):  # one file per self-training round: `dvc plots` draws each
        atomic_write_bytes(Path(plots) / "pr" / f"round-{r}.csv", pr_csv(curve))
    atomic_write_bytes(Path(plots) / "detections.png", grid_png)
    atomic_write_bytes(Path(plots) / "quality.png", quality_png)
    get_run_logger().info("metrics: %s", result)
    return result


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("evaluate", ["test", "ood", "images", "features", "reference", "real", "detector", "concepts",
                                      "metrics", "plots"], argv)
    return evaluate_flow(params, args.test, args.images, args.features, args.detector, args.metrics, args.plots,
                         args.ood, args.reference, args.real, args.concepts)


if __name__ == "__main__":
    command(main)
