"""Stage evaluate: discovery CorLoc (learned vs random weights), detector AP per round, prompt alignment.

The discovery it scores is stage discover_splits' (the configured patch
backbone, with its learned and its random weights, on the same splits), so a
new detector is scored without cutting the splits again; prompt alignment
compares the configured encoder's image and text embeddings.
"""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from mirage.data.params import Params
from mirage.data.store import atomic_write_bytes, atomic_write_json
from mirage.run.stage import command, parse
from tasks.evaluate import evaluate, pr_csv


@flow(name="evaluate")
def evaluate_flow(params: Params, test: str, images: str, features: str, detector: str, discovered: str,
                  metrics: str, plots: str, ood: str | None = None, reference: str | None = None,
                  real: str | None = None, concepts: str | None = None) -> dict:
    """Metrics on the test split and, side by side, on the ood split (`ood`,
    when it holds scenes): TokenCut's and MaskCut's discovery (`discovered`:
    stage discover_splits' table), and the detector of every round (its
    pseudo-labels' teacher is discovery); `concepts`: stage concepts' output
    (its measures are reported here)."""
    result, curves, grid_png, quality_png = evaluate(params, test, images, features, detector, discovered, ood,
                                                     reference, real)
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
    params, args = parse("evaluate", ["test", "ood", "images", "features", "reference", "real", "detector",
                                      "discovered", "concepts", "metrics", "plots"], argv)
    return evaluate_flow(params, args.test, args.images, args.features, args.detector, args.discovered, args.metrics,
                         args.plots, args.ood, args.reference, args.real, args.concepts)


if __name__ == "__main__":
    command(main)
