"""Stage evaluate: discovery CorLoc (learned vs random weights), detector AP per round, prompt alignment.

Every model comes from params.yaml (`features.encoder`, `features.patch_backbone`,
`generate.model`): the random-weight baseline is the configured backbone's own
architecture, and prompt alignment compares the configured encoder's image and
text embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import flow, get_run_logger

from mirage.devices import resolve_device
from mirage.fingerprint import encoder_spec
from mirage.images import decode_png
from mirage.models import ImageEncoder, load_encoder, load_patch_backbone
from mirage.params import Discover, Features, Params
from mirage.runner import open_runner
from mirage.stage import command, parse
from mirage.store import atomic_write_bytes, atomic_write_json, read_table
from tasks.evaluate import (detector_metrics, discovered_boxes, discovered_by_methods, discovery_metrics, draw_grid,
                            prompt_alignment, top_box)
from tasks.train_detector import load_detector, predict


def load_test_split(test: str, classes: list[str]) -> dict:
    """The ground truth: uint8 images N x H x W x 3, boxes (x, y, w, h px), masks (RLE), class ids."""
    scenes = read_table(test, columns=["image", "objects"]).to_pylist()
    return {
        "images": np.stack([decode_png(r["image"]) for r in scenes]),
        "boxes": [[o["box"] for o in r["objects"]] for r in scenes],
        "masks": [[o["mask"] for o in r["objects"]] for r in scenes],
        "labels": [[classes.index(o["class_name"]) + 1 if o["class_name"] in classes else 0 for o in r["objects"]]
                   for r in scenes],
    }


@dataclass(frozen=True)
class SplitDiscoveryJob:
    """Discovery on evaluation images, patch features computed on the fly,
    wherever it runs (mirage/runner.py); `random_seed`: the same backbone with
    random weights (the baseline)."""

    fcfg: Features
    dcfg: Discover
    generator: str
    random_seed: int | None = None
    methods: tuple[str, ...] = ()  # other cuts on the same features (TokenCut and MaskCut side by side)

    def load_key(self) -> tuple:
        f = self.fcfg
        return ("split-discovery", f.encoder, f.device, f.dtype, f.patch_backbone, self.generator, self.random_seed)

    def load(self):
        encoder = load_encoder(encoder_spec(self.fcfg.encoder), resolve_device(self.fcfg.device), self.fcfg.dtype)
        return load_patch_backbone(self.fcfg.patch_backbone, encoder, self.generator, random_seed=self.random_seed)

    def describe(self, backbone) -> dict:
        return {}

    def prepare(self, backbone, images: np.ndarray) -> np.ndarray:
        return images

    def compute(self, backbone, images: np.ndarray) -> list[dict[str, np.ndarray]] | list[list[dict]]:
        sizes = [images.shape[1:3]] * len(images)
        if not self.methods:
            return discovered_boxes(backbone, images, sizes, self.dcfg)
        cfgs = [self.dcfg.model_copy(update={"method": m}) for m in self.methods]
        return discovered_by_methods(backbone, images, sizes, cfgs)


def discover_split(run, job: SplitDiscoveryJob, images: np.ndarray, batch: int = 128):
    """Discovered boxes per test image, in order, on the runner `run`; with
    `job.methods`, {method: boxes per image}."""
    batches = [images[start : start + batch] for start in range(0, len(images), batch)]
    found = dict(run.map(job, batches)) if batches else {}
    if not job.methods:
        return [f for i in range(len(found)) for f in found[i]]
    return {m: [f for i in range(len(found)) for f in found[i][k]] for k, m in enumerate(job.methods)}


def detector_rounds(detector: str, gt: dict, score_thresh: float) -> tuple[list[dict], list[np.ndarray], list[dict]]:
    """Metrics and PR curve of every self-training round's detector, and the last round's detections."""
    rounds, curves, dets = [], [], []
    size = gt["images"].shape[1:3]
    for path in sorted(Path(detector).glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        model = load_detector(path)
        dets = [{k: v[d["scores"] >= score_thresh] for k, v in d.items()} for d in predict(model, gt["images"])]
        metrics, pr = detector_metrics(model, dets, gt["boxes"], size, gt["labels"], gt["masks"])
        rounds.append(metrics)
        curves.append(pr)
    if not rounds:
        raise FileNotFoundError(f"{detector} holds no round-K detector (run stage train_detector)")
    return rounds, curves, dets


def generation_alignment(encoder: ImageEncoder, images: str, features: str, cfg: Discover) -> tuple[float | None, int]:
    """Share of generated images whose zero-shot class (configured encoder's
    image embedding vs its text embeddings of the class prompts) is the
    prompted one; None for an image-only encoder."""
    classes = list(cfg.classes)
    gen = read_table(images, columns=["id", "class_name"]).to_pylist()
    if not encoder.has_text:
        return None, len(gen)
    emb = {r["id"]: r["embedding"] for r in read_table(features, columns=["id", "embedding"]).to_pylist()}
    with torch.inference_mode():
        text = encoder.encode_text([cfg.prompt_template.format(c) for c in classes]).float().cpu().numpy()
    known = [r for r in gen if r["class_name"] in classes and r["id"] in emb]  # failed items have no features
    image_emb = np.array([emb[r["id"]] for r in known], dtype=np.float32).reshape(len(known), -1)
    return prompt_alignment(image_emb, text, [classes.index(r["class_name"]) for r in known]), len(gen)


def write_plots(plots: str, curves: list[np.ndarray], grid_png: bytes) -> None:
    plot_dir = Path(plots)
    for r, curve in enumerate(curves):  # one file per self-training round: `dvc plots` draws each
        rows = "".join(f"{x:.2f},{p:.4f}\n" for x, p in zip(np.linspace(0, 1, 101), curve))
        atomic_write_bytes(plot_dir / "pr" / f"round-{r}.csv", ("recall,precision\n" + rows).encode())
    atomic_write_bytes(plot_dir / "detections.png", grid_png)


@flow(name="evaluate")
def evaluate_flow(params: Params, test: str, images: str, features: str, detector: str, metrics: str,
                  plots: str, ood: str | None = None) -> dict:
    """Metrics on the test split and, side by side, on the ood split (`ood`,
    when it holds scenes): TokenCut's and MaskCut's discovery, and the
    detector of every round (its pseudo-labels' teacher is discovery)."""
    cfg, dcfg, fcfg = params.evaluate, params.discover, params.features
    gt = load_test_split(test, list(dcfg.classes))
    splits = {"test": gt}
    if ood and read_table(ood, columns=["key"]).num_rows:
        splits["ood"] = load_test_split(ood, list(dcfg.classes))
    encoder = load_encoder(encoder_spec(fcfg.encoder), resolve_device(fcfg.device), fcfg.dtype)
    methods = tuple(dict.fromkeys([dcfg.method, "tokencut", "maskcut"]))  # the configured one first
    with open_runner(params.runner, "evaluate") as run:  # the splits' discovery: on Dask workers with kind dask
        both = {name: discover_split(run, SplitDiscoveryJob(fcfg, dcfg, params.generate.model, methods=methods),
                                     split["images"]) for name, split in splits.items()}
        random = discover_split(run, SplitDiscoveryJob(fcfg, dcfg, params.generate.model, cfg.random_seed), gt["images"])
    learned = both["test"][dcfg.method]
    size = gt["images"].shape[1:3]
    found = discovery_metrics(learned, gt["boxes"], size, cfg.iou)
    rounds, curves, dets = detector_rounds(detector, gt, cfg.score_thresh)
    side_by_side = {}
    for name, split in splits.items():
        split_size = split["images"].shape[1:3]
        side_by_side[name] = {
            "images": len(split["images"]),
            "discovery": {m: {k: v for k, v in discovery_metrics(both[name][m], split["boxes"], split_size, cfg.iou).items()
                              if k in ("corloc", "ap50", "ap")} for m in methods},
            "detector": [{k: r[k] for k in ("ap50", "ap")} for r in
                         (rounds if name == "test" else detector_rounds(detector, split, cfg.score_thresh)[0])],
        }
    alignment, n_generated = generation_alignment(encoder, images, features, dcfg)
    result = {
        "discovery": {"method": dcfg.method, "backbone": fcfg.patch_backbone, "encoder": fcfg.encoder,
                      "corloc": found["corloc"], "ap50": found["ap50"],
                      "corloc_random_weights": discovery_metrics(random, gt["boxes"], size, cfg.iou)["corloc"]},
        "detector": {**rounds[-1], "rounds": rounds},
        "generation": {"prompt_alignment": alignment, "images": n_generated},
        "test_images": len(gt["images"]),
        "splits": side_by_side,
    }
    atomic_write_json(Path(metrics), result)
    n = min(cfg.grid_images, len(gt["images"]))
    top = [[d["boxes"][0].tolist()] if len(d["boxes"]) else [] for d in dets[:n]]
    write_plots(plots, curves, draw_grid(gt["images"][:n], gt["boxes"][:n], [[top_box(f)] for f in learned[:n]], top))
    get_run_logger().info("metrics: %s", result)
    return result


def main(argv: list[str] | None = None):
    """The stage's command; returns what its flow returns (counts, metrics)."""
    params, args = parse("evaluate", ["test", "ood", "images", "features", "detector", "metrics", "plots"], argv)
    return evaluate_flow(params, args.test, args.images, args.features, args.detector, args.metrics, args.plots,
                         args.ood)


if __name__ == "__main__":
    command(main)
