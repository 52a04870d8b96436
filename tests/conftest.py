"""Shared fixtures: a Prefect test server for the session and tiny projects."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Tiny values for every stage: the whole loop in seconds on one core.
TINY = {
    "toyworld": {"train": {"n": 48}, "test": {"n": 12}},
    "train_generator": {"steps": 2, "batch_size": 4, "block_out_channels": [16, 16]},
    "train_encoder": {"steps": 2, "batch_size": 8},
    "generate": {"per_prompt": 2, "steps": 2, "batch_size": 4},
    "features": {"batch_size": 4},
    "train_detector": {"steps": 2, "batch_size": 4, "self_train_steps": 2, "class_aware": True},
    "evaluate": {"grid_images": 4},
}


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    return merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server and database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_project(tmp_path: Path, tiny_params: dict) -> Path:
    """A copy of the project's pipeline (dvc.yaml, stage code) with tiny params, DVC-initialised."""
    from dvc.repo import Repo

    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root)
    for pkg in ("flows", "tasks", "mirage"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params, sort_keys=False))
    Repo.init(str(root), no_scm=True).close()
    return root
