"""End to end: the whole loop on a tiny config, then staleness and reruns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from mirage import pipeline
from mirage.cli import main as cli_main
from mirage.store import read_table

ALL = ["toyworld", "train_generator", "train_encoder", "generate", "features", "discover", "train_detector", "evaluate"]


def ran(results):
    return [r.name for r in results if r.ran]


def test_pipeline_runs_reruns_nothing_then_only_downstream(tiny_project):
    first = pipeline.run(tiny_project)
    assert ran(first) == ALL

    metrics = json.loads((tiny_project / "metrics/evaluate.json").read_text())
    for value in (metrics["discovery"]["corloc"], metrics["discovery"]["corloc_random_weights"],
                  metrics["detector"]["ap50"], metrics["generation"]["prompt_alignment"]):
        assert 0.0 <= value <= 1.0
    assert metrics["test_images"] == 12 and metrics["generation"]["images"] == 6
    assert (tiny_project / "plots/detections.png").stat().st_size > 0
    curves = sorted(p.name for p in (tiny_project / "plots/pr").iterdir())
    assert curves == ["round-0.csv", "round-1.csv"]  # round 0 + one self-training round
    assert (tiny_project / "plots/pr/round-1.csv").read_text().startswith("recall,precision")
    assert len(metrics["detector"]["rounds"]) == 2
    assert 0.0 <= metrics["detector"]["rounds"][-1]["class_aware"]["ap50"] <= 1.0  # tiny config trains class-aware
    images = read_table(tiny_project / "data/generated")
    assert images.num_rows == 6
    assert set(images.column("class_name").to_pylist()) == {"circle", "square", "triangle"}
    assert len(set(images.column("seed").to_pylist())) == 6  # one recorded seed per item
    assert (tiny_project / "dvc.lock").exists()

    assert ran(pipeline.run(tiny_project)) == []
    assert pipeline.stale(tiny_project) == {}

    before = {p.name: p.read_bytes() for p in (tiny_project / "data/features").glob("*.parquet")}
    again = pipeline.run(tiny_project, {"discover.tau": 0.3})
    assert ran(again) == ["discover", "train_detector", "evaluate"]
    after = {p.name: p.read_bytes() for p in (tiny_project / "data/features").glob("*.parquet")}
    assert before == after  # upstream outputs untouched


def test_dvc_repro_alone_runs_a_stage_and_agrees_with_mirage(tiny_project):
    """`dvc repro` runs the same stage commands through DVC, each in its own process."""
    pipeline.run(tiny_project)
    before = (tiny_project / "dvc.lock").read_text()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "--force", "--single-item", "discover"],
                          cwd=tiny_project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running stage 'discover'" in done.stdout
    # same params, same inputs: dvc repro reproduces mirage's outputs byte for byte
    assert (tiny_project / "dvc.lock").read_text() == before
    assert pipeline.stale(tiny_project) == {}


def test_bad_override_fails_before_any_work(tiny_project, capsys):
    code = cli_main(["--root", str(tiny_project), "run", "-S", "discover.tua=0.3"])
    assert code == 2
    assert "discover.tua" in capsys.readouterr().err
    assert not (tiny_project / "data").exists()
    code = cli_main(["--root", str(tiny_project), "run", "-S", "generate.per_prompt=-1"])
    assert code == 2
    assert "generate.per_prompt" in capsys.readouterr().err
    assert not (tiny_project / "data").exists()
