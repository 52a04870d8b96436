"""The README's real-profile recipe as a user runs it: real architectures
saved with random weights (the way their libraries save pretrained ones),
switched in from the toy defaults with `-S`, through every stage to metrics,
and switched back, which computes nothing."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import UNFROZEN

from flows import pipeline
from mirage.data.store import read_table
from mirage.run import scheduler

pytestmark = pytest.mark.slow  # real architectures through every stage


def counts(results) -> dict:
    return {r.name: (r.result or {}).get("computed") if isinstance(r.result, dict) else None
            for r in results if r.ran}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """What the README's recipe saves: `python -m mirage.random_models ...`."""
    root = tmp_path_factory.mktemp("models")
    for args in (["tiny-sd", root / "sd"], ["open_clip", "ViT-B-32", root / "vit-b-32"],
                 ["timm", "vit_small_patch16_224", root / "vit-s-16"]):
        done = subprocess.run([sys.executable, "-m", "mirage.random_models", *map(str, args)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    return {"sd": root / "sd", "clip": root / "vit-b-32", "timm": root / "vit-s-16"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory, new_project):
    """A small project after its toy run (fewer images than conftest.TINY: the
    real architectures are slow on a CPU)."""
    from conftest import TINY

    small = {**TINY, "toyworld": {"train": {"n": 48}, "test": {"n": 12}, "ood": {"n": 12}, "unlabeled": None},
             "generate": {"per_prompt": 2, "steps": 4, "batch_size": 4}, "features": {"batch_size": 4},
             "train_detector": {"steps": 4, "batch_size": 4, "self_train_steps": 2, "class_aware": True},
             "evaluate": {"grid_images": 4, "quality_k": 2}}  # 6 generated images: k-NN manifolds of 2 neighbours
    root = new_project(tmp_path_factory.mktemp("toy"), small)
    assert [r.name for r in pipeline.run(root) if r.ran] == UNFROZEN
    return root


def test_switch_to_real_models_and_back(toy, models, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(toy, root, symlinks=True)
    monkeypatch.chdir(root)  # the pool (.mirage/pool) lives in the project
    toy_metrics = (root / "metrics/evaluate.json").read_text()
    toy_lock = (root / "dvc.lock").read_text()
    real = {"generate.model": str(models["sd"]), "generate.guidance": 0.0, "generate.steps": 2,
            "generate.image_size": 32, "features.encoder": str(models["clip"]),
            "features.patch_backbone": "encoder:keys", "discover.tau": 0.2,
            "concepts.encoder_layers": [-1]}  # one block of ViT-B-32 (3072 units): every block's moments are 1.9 GB
    first = pipeline.run(root, real)
    assert [r.name for r in first if r.ran] == ["generate", "concepts", "features", "curate", "discover", "train_detector",
                                                 "discover_splits", "evaluate"]
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    d = metrics["discovery"]
    assert d["encoder"] == str(models["clip"]) and d["backbone"] == "encoder:keys"
    # random weights claim no quality; what can break is the wiring: every metric over the 12 test
    # images (a share of hits k/12), the configured cut's numbers where the side-by-side table has them
    assert metrics["test_images"] == 12 and metrics["splits"]["ood"]["images"] == 12
    for share in (d["corloc"], d["corloc_random_weights"]):
        assert abs(share * 12 - round(share * 12)) < 1e-9
    assert d["corloc"] == metrics["splits"]["test"]["discovery"]["tokencut"]["corloc"]
    assert len(metrics["detector"]["rounds"]) == 2 == len(metrics["splits"]["ood"]["detector"])
    assert metrics["generation"]["prompt_alignment"] is not None  # ViT-B-32's own text tower
    quality = metrics["generation"]["quality"]  # FD on 512-d embeddings of 6 images a side: finite, N recorded
    assert quality["n"] == 6 and all(math.isfinite(quality[k]) for k in ("fd", "kid", "precision", "coverage"))
    assert metrics != json.loads(toy_metrics)
    images = read_table(root / "data/generated").to_pylist()
    assert {r["model"].split("@")[0] for r in images} == {"sd"}
    # the naming encoder is the configured one: discovery keys carry its fingerprint
    from mirage.data.store import table_metadata
    assert table_metadata(root / "data/discovery")["model"].startswith("vit-b-32@")
    assert table_metadata(root / "data/features")["grid"] == "7,7,768"

    # a timm ViT (no text tower): objects stay unnamed, no prompt alignment
    timm = pipeline.run(root, {"features.encoder": str(models["timm"])})
    assert [r.name for r in timm if r.ran] == ["concepts", "features", "curate", "discover", "train_detector",
                                         "discover_splits", "evaluate"]
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    assert metrics["generation"]["prompt_alignment"] is None
    assert table_metadata(root / "data/features")["grid"] == "14,14,384"

    # and back to the toy defaults: nothing is computed, outputs are the toy run's
    back = pipeline.run(root, {"generate.model": "models/generator", "generate.guidance": 2.0, "generate.steps": 4,
                               "generate.image_size": None, "features.encoder": "models/encoder",
                               "features.patch_backbone": "unet:down_blocks.0.resnets.0:10", "discover.tau": 0.8,
                               "concepts.encoder_layers": []})
    assert counts(back) == {"generate": 0, "features": 0, "curate": 0, "discover": 0, "concepts": 0, "train_detector": None,
                            "discover_splits": None, "evaluate": None}
    assert {r.name for r in back if r.restored} == {"train_detector", "discover_splits", "evaluate"}
    assert (root / "metrics/evaluate.json").read_text() == toy_metrics
    assert (root / "dvc.lock").read_text() == toy_lock
    assert scheduler.stale(root) == {}
    leftovers = [p for p in root.rglob("*") if ".work" in p.parts or ".tmp-" in p.name]
    assert leftovers == []
