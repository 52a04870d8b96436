"""Stage discover_splits: the teacher's cuts on the evaluation splits.

TokenCut and MaskCut on the test and ood scenes (patch features computed on
the fly by the configured patch backbone), and the configured method with
the same backbone's random weights on the test scenes (evaluate's baseline).
None of it depends on the detector, so it is a stage of its own: a new
detector (any train_detector change) reruns evaluate without redoing these
cuts, and this stage runs beside train_detector.  Evaluate reads the table
(tasks/evaluate.py `split_boxes`) and scores it against the ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch

from mirage.data import schema
from mirage.data.images import decode_png
from mirage.data.params import Discover, Features, Params
from mirage.data.store import read_table
from mirage.models.devices import resolve_device
from mirage.models.encoders import load_encoder
from mirage.models.fingerprint import encoder_spec
from mirage.models.patch_backbones import load_patch_backbone


def discovered_boxes(backbone, images: np.ndarray, sizes: list[tuple[int, int]], cfg,
                     device: torch.device | None = None) -> list[dict[str, np.ndarray]]:
    """Objects discovered in a batch: `images` uint8 B x S x S x 3 at the
    backbone's input size, `sizes` each image's own (height, width), `cfg` a
    Discover section (`device`: where its torch solver runs).  Per image,
    boxes (x, y, w, h) in its own pixels, best cut first, with their scores
    (1 - the cut's eigenvalue)."""
    return discovered_by_methods(backbone, images, sizes, [cfg], device)[0]


def discovered_by_methods(backbone, images: np.ndarray, sizes: list[tuple[int, int]], cfgs: list,
                          device: torch.device | None = None) -> list[list[dict]]:
    """`discovered_boxes` for several Discover sections (TokenCut and MaskCut)
    on one computation of the patch features: one list of images per section."""
    from tasks.discover import cut_graphs, cut_to_object, graph_key, graphs_of

    patches, grid = backbone.patches(images)
    out: list[list[dict]] = []
    graphs: dict[tuple, list] = {}  # the methods share the graphs built the same way
    for cfg in cfgs:
        built = graph_key(cfg)
        if built not in graphs:
            graphs[built] = graphs_of(list(patches), cfg, device or torch.device("cpu"))
        cuts = cut_graphs(graphs[built], grid, cfg)
        out.append([{"boxes": np.array([cut_to_object(c, h, w)[1] for c in image_cuts],
                                       dtype=np.float64).reshape(-1, 4),
                     "scores": np.array([1.0 - c.eigenvalue for c in image_cuts])}
                    for image_cuts, (h, w) in zip(cuts, sizes)])
    return out


@dataclass(frozen=True)
class SplitDiscoveryJob:
    """Discovery on evaluation images, patch features computed on the fly,
    wherever it runs (mirage/run/runner.py); `random_seed`: the same backbone with
    random weights (the baseline)."""

    fcfg: Features
    dcfg: Discover
    generator: str
    random_seed: int | None = None
    methods: tuple[str, ...] = ()  # other cuts on the same features (TokenCut and MaskCut side by side)
    concepts: str | None = None  # stage concepts' output (a `concepts` patch backbone's units)

    def load_key(self) -> tuple:
        f = self.fcfg
        return ("split-discovery", f.encoder, f.device, f.dtype, f.patch_backbone, self.generator, self.random_seed,
                self.concepts)

    def load(self):
        encoder = load_encoder(encoder_spec(self.fcfg.encoder), resolve_device(self.fcfg.device), self.fcfg.dtype)
        return load_patch_backbone(self.fcfg.patch_backbone, encoder, self.generator, random_seed=self.random_seed,
                                   concepts=self.concepts)

    def describe(self, backbone) -> dict:
        return {}

    def prepare(self, backbone, images: np.ndarray) -> np.ndarray:
        return images

    def compute(self, backbone, images: np.ndarray) -> list[dict[str, np.ndarray]] | list[list[dict]]:
        sizes = [images.shape[1:3]] * len(images)
        device = resolve_device(self.fcfg.device)
        if not self.methods:
            return discovered_boxes(backbone, images, sizes, self.dcfg, device)
        cfgs = [self.dcfg.model_copy(update={"method": m}) for m in self.methods]
        return discovered_by_methods(backbone, images, sizes, cfgs, device)


def discover_split(run, job: SplitDiscoveryJob, images: np.ndarray, batch: int = 128,
                   on_batch: Callable[[int], None] | None = None):
    """Discovered boxes per test image, in order, on the runner `run`; with
    `job.methods`, {method: boxes per image}.  `on_batch(n)`: after each
    batch of n images (a progress bar)."""
    batches = [images[start : start + batch] for start in range(0, len(images), batch)]
    found = {}
    for index, out in run.map(job, batches):
        found[index] = out
        if on_batch:
            on_batch(len(batches[index]))
    if not job.methods:
        return [f for i in range(len(found)) for f in found[i]]
    return {m: [f for i in range(len(found)) for f in found[i][k]] for k, m in enumerate(job.methods)}


def split_images(split: str) -> np.ndarray:
    """A scenes table's images, uint8 N x H x W x 3, in table order."""
    return np.stack([decode_png(r["image"]) for r in read_table(split, columns=["image"]).to_pylist()])


def methods_of(cfg: Discover) -> tuple[str, ...]:
    """The methods cut on every split: the configured one first, then TokenCut and MaskCut."""
    return tuple(dict.fromkeys([cfg.method, "tokencut", "maskcut"]))


def discover_splits(params: Params, run, splits: dict[str, np.ndarray], concepts: str | None = None,
                    on_batch: Callable[[int], None] | None = None) -> pa.Table:
    """The SPLIT_BOXES table: every split's images ({name: uint8 N x H x W x 3})
    cut by each of `methods_of(params.discover)` with the learned weights, and
    the test split by the configured method with random weights
    (`evaluate.random_seed`); `run`: a runner (mirage/run/runner.py)."""
    fcfg, dcfg, generator = params.features, params.discover, params.generate.model
    rows = []
    for name, images in splits.items():
        job = SplitDiscoveryJob(fcfg, dcfg, generator, methods=methods_of(dcfg), concepts=concepts)
        rows += split_rows(name, "learned", discover_split(run, job, images, on_batch=on_batch))
    if "test" in splits:
        job = SplitDiscoveryJob(fcfg, dcfg, generator, params.evaluate.random_seed, concepts=concepts)
        rows += split_rows("test", "random", {dcfg.method: discover_split(run, job, splits["test"], on_batch=on_batch)})
    return pa.Table.from_pylist(rows, schema=schema.SPLIT_BOXES)


def split_rows(split: str, weights: str, found: dict[str, list[dict[str, np.ndarray]]]) -> list[dict]:
    """SPLIT_BOXES rows of {method: per image, `discovered_boxes`' boxes and scores}."""
    return [{"split": split, "weights": weights, "method": method, "image": i,
             "boxes": f["boxes"].tolist(), "scores": f["scores"].tolist()}
            for method, per_image in found.items() for i, f in enumerate(per_image)]
