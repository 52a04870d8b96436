"""Shared fixtures: a Prefect test server for the session and tiny projects."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one compute thread each (no OpenMP spinning)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
from ci_skips import pytest_runtest_makereport  # noqa: F401 - a skip on CI fails unless declared (tests/ci_skips.py)

import mirage  # noqa: F401 - its Prefect settings (no telemetry, startup timeout) before any server starts

ROOT = Path(__file__).resolve().parents[1]

# Small values for every stage: the whole loop in about a minute on 2 cores,
# with the committed toy models (frozen stages).  Discovery's quality is
# measurable here (CorLoc bands); the detector trains a few steps only, since
# most tests that copy this project check plumbing and retrain it: its quality
# bands come from TRAINED (the `trained` fixture, more steps on the same tables).
TINY = {
    # no unlabeled scenes (the default sources.images): the tests of imported images make their own
    "toyworld": {"train": {"n": 48}, "test": {"n": 40}, "ood": {"n": 24}, "unlabeled": None},
    "sources": {"images": []},
    "train_generator": {"steps": 2, "batch_size": 4, "block_out_channels": [16, 16]},  # `mirage train` tests
    "train_encoder": {"steps": 2, "batch_size": 8},
    "generate": {"per_prompt": 8, "steps": 10, "batch_size": 8},
    "features": {"batch_size": 8},
    # pinned (not params.yaml's defaults): the fault, dashboard and resume tests count these rounds and steps
    "train_detector": {"steps": 8, "batch_size": 8, "self_train_steps": 4, "class_aware": True,
                       "self_train_scores": [0.7], "min_size": 64, "copy_paste": 0.0, "scale_jitter": None,
                       "mix": {"generated": 1.0, "imported": 1.0}, "drop_spanning": False},
    "evaluate": {"grid_images": 4, "quality_bootstrap": 10},
    "concepts": {"chunk": 16, "sample_images": 16},  # two chunks of the 24 generated images
}


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server and database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import get_current_settings

    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    with prefect_test_harness(server_startup_timeout=120):
        # processes the tests start (stage commands under `dvc repro` and `dvc exp run`, `mirage` commands)
        # report here too, instead of each starting a temporary server of its own (~7 s apiece); the tests
        # of what happens without a configured API take PREFECT_API_* out of their processes' environment
        os.environ["PREFECT_API_URL"] = get_current_settings().api.url
        os.environ["DVC_NO_ANALYTICS"] = "1"  # no daemon per `dvc` command trying to reach the internet
        try:
            yield
        finally:
            os.environ.pop("PREFECT_API_URL", None)


def prefect_api(url: str, body: dict | None = None, attempts: int = 8):
    """One call to a Prefect server's REST API, GET or POST (with `body`).
    A 503 is the server saying "retry" (SQLite was busy: Prefect rolls the
    transaction back and answers 503, and its own client retries those), so
    a test's raw call retries it the same way instead of failing on it."""
    import time

    import httpx

    for attempt in range(attempts):
        response = httpx.post(url, json=body, timeout=30) if body is not None else httpx.get(url, timeout=30)
        if response.status_code != 503 or attempt == attempts - 1:
            break
        time.sleep(min(2 ** attempt * 0.25, 4.0))
    response.raise_for_status()
    return response.json()


def api(path: str, body: dict | None = None):
    """A call to the session's Prefect server (`path` under its /api)."""
    from prefect.settings import get_current_settings

    return prefect_api(get_current_settings().api.url + path, body)


def artifacts_of(flow_run_ids: list[str]) -> list[dict]:
    return api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200})


def png_size(url: str) -> tuple[int, int]:
    from PIL import Image

    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A local HTTP server standing in for alerts.webhook: (its URL, the JSON bodies it received)."""
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Hook.received
    server.shutdown()


# Test files by how long they take (measured on 2 cores, slowest first).  The
# suite runs on two workers a file at a time (pyproject: `-n 2 --dist loadfile
# --no-loadscope-reorder`, so a file's module fixtures are made once); handed
# out longest first, the files finish close together on both workers.
LONG_FILES = ["test_pipeline.py", "test_faults.py", "test_server.py", "test_concurrency.py", "test_scale_out.py",
              "test_dashboard.py", "test_real_profile.py", "test_import.py", "test_item_keys.py", "test_bad_params.py",
              "test_models.py", "test_quality.py", "test_experiments.py", "test_postgres.py", "test_resources.py",
              "test_real_models.py", "test_curate.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def make_project(parent: Path, values: dict) -> Path:
    """A copy of the project's pipeline (dvc.yaml, stage code, the committed toy
    models) with `values` set in its params.yaml, DVC-initialised."""
    from dvc.repo import Repo

    from mirage.data.params import write_overrides

    root = parent / "project"
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root)
    for pkg in ("flows", "tasks", "mirage", "models/generator", "models/encoder"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", root)
    write_overrides(root / "params.yaml", flatten(values))  # the project's own round-trip writer
    Repo.init(str(root), no_scm=True).close()
    return root


@pytest.fixture(scope="session")
def new_project():
    """make_project, for fixtures of other scopes."""
    return make_project


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return make_project(tmp_path, TINY)


FROZEN = ["train_generator", "train_encoder"]
UNFROZEN = ["toyworld", "import", "generate", "concepts", "features", "curate", "discover", "train_detector", "discover_splits",
            "evaluate"]


@dataclass
class Finished:
    root: Path
    flow_run_id: str  # its `mirage-pipeline` flow run on the session's Prefect server
    results: dict  # stage name -> scheduler.StageResult of that run


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Finished:
    """A tiny project after one full `mirage run` (every unfrozen stage ran)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from flows import pipeline


    root = make_project(tmp_path_factory.mktemp("done"), TINY)
    first = pipeline.run(root)
    assert [r.name for r in first if r.ran] == UNFROZEN  # the committed toy models are frozen: never retrained
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["mirage-pipeline"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=1)
    return Finished(root, str(runs[0].id), {r.name: r for r in first})


# What the `trained` project changes: enough detector steps to learn the 24
# generated images' pseudo-boxes (measured bands in tests/test_pipeline.py)
TRAINED = {"train_detector.steps": 160, "train_detector.self_train_steps": 80}


@pytest.fixture(scope="session")
def trained(finished, tmp_path_factory) -> Path:
    """A copy of the finished tiny project whose detector trained TRAINED's
    steps (only train_detector and evaluate rerun)."""
    from flows import pipeline

    root = tmp_path_factory.mktemp("trained") / "project"
    shutil.copytree(finished.root, root, symlinks=True)
    assert [r.name for r in pipeline.run(root, TRAINED) if r.ran] == ["train_detector", "evaluate"]
    return root


@pytest.fixture(scope="session")
def done(finished) -> Path:
    return finished.root


@pytest.fixture
def project(done, tmp_path) -> Path:
    """A copy of the finished tiny project, free to change."""
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    return root
