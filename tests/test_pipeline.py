"""End to end: the whole loop on a small config with the committed toy models,
its quality held by bands, then staleness, status and reruns."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import api, artifacts_of, png_size

from flows import pipeline
from mirage.cli import main as cli_main
from mirage.data.params import load as load_params
from mirage.data.params import write_overrides
from mirage.data.store import read_table, table_metadata
from mirage.run import scheduler

# Quality bands for the small config of conftest.TINY (40 test scenes, 24
# generated images), with the committed toy models.  Measured on 2-core x86
# machines: discovery CorLoc 0.95, random-weight baseline 0.75.  The detector's
# bands are held by the `trained` project (conftest.TRAINED: 160 + 80 steps on
# the same pseudo-boxes); the plumbing project's 8 + 4 steps learn nothing to
# speak of.  Bands: the measured values less a margin for another CPU's float
# bytes (a broken detector, loss or evaluation falls far below them).
CORLOC_MIN = 0.85          # measured 0.95
CORLOC_OVER_RANDOM = 0.10  # learned minus random-weight CorLoc; measured 0.20
# the trained project's last round (measured AP50 0.65, AP 0.24, class-aware AP50 0.26, ood AP50 0.53;
# the plumbing project's 8 + 4 steps: AP50 0.02, the level a detector that learns nothing stays at)
DETECTOR_AP50_MIN = 0.45
DETECTOR_AP_MIN = 0.12
CLASS_AWARE_AP50_MIN = 0.12
OOD_AP50_MIN = 0.30


def ran(results):
    return [r.name for r in results if r.ran]


def test_first_run_writes_every_output_and_holds_the_quality_bands(done):
    metrics = json.loads((done / "metrics/evaluate.json").read_text())
    d, det = metrics["discovery"], metrics["detector"]
    assert metrics["test_images"] == 40 and metrics["generation"]["images"] == 24
    assert d["corloc"] >= CORLOC_MIN
    assert d["corloc"] - d["corloc_random_weights"] >= CORLOC_OVER_RANDOM
    assert len(det["rounds"]) == 2 and {"ap", "ap50", "ap75", "ar100"} <= set(det["rounds"][-1]["class_aware"])
    curves = sorted(p.name for p in (done / "plots/pr").iterdir())
    assert curves == ["round-0.csv", "round-1.csv"]  # round 0 + one self-training round
    assert (done / "plots/pr/round-1.csv").read_text().startswith("recall,precision")
    assert (done / "plots/detections.png").stat().st_size > 0
    images = read_table(done / "data/generated")
    assert images.num_rows == 24
    assert set(images.column("class_name").to_pylist()) == {"circle", "square", "triangle"}
    assert len(set(images.column("seed").to_pylist())) == 24  # one recorded seed per item
    assert all(m.startswith("generator@") for m in images.column("model").to_pylist())
    # distribution metrics at one N on both sides (24 generated; 48 train scenes: 2 x 24 reference), the floor,
    # intervals and classes; curate is off by default: every generated image kept
    q = metrics["generation"]["quality"]
    assert q["n"] == q["floor"]["n"] == 24 and q["reference_images"] == 48 and q["reference"] == "toyworld train split"
    assert set(q["ci95"]) == {"fd", "kid", "precision", "recall", "density", "coverage"}
    assert {c: m["n"] for c, m in q["per_class"].items()} == {"circle": 8, "square": 8, "triangle": 8}
    assert read_table(done / "data/reference").num_rows == 48
    assert (done / "plots/quality.png").stat().st_size > 0
    curated = pq.read_table(done / "data/curated/curated.parquet").to_pylist()
    assert len(curated) == 24 and all(r["kept"] for r in curated)


@pytest.mark.slow
def test_curate_on_keeps_a_balanced_subset_that_discover_alone_sees(project):
    ran = [r.name for r in pipeline.run(project, {"curate.enabled": True, "curate.clusters": [6, 2], "curate.target": 12})
           if r.ran]
    assert ran == ["curate", "discover", "train_detector", "evaluate"]
    curated = pq.read_table(project / "data/curated/curated.parquet").to_pylist()
    kept = {r["id"] for r in curated if r["kept"]}
    assert len(kept) == 12 and all(r["reason"] in ("duplicate", "balance") for r in curated if not r["kept"])
    assert set(read_table(project / "data/discovery").column("image_id").to_pylist()) == kept
    assert (project / "data/curated/duplicates.png").exists()
    # the stage's flow again with a target of one image more: the clusters and every decision of the run
    # before stand (its state.json), one more image is kept
    from flows.curate import curate_flow

    cfg = load_params(project / "params.yaml", {"curate.target": 13}).curate
    again = curate_flow(cfg, str(project / "data/generated"), str(project / "data/features"), str(project / "data/curated"))
    assert again["reused"] == 24 and again["kept"] == 13


@pytest.mark.slow
def test_the_trained_detector_holds_its_bands(trained):
    metrics = json.loads((trained / "metrics/evaluate.json").read_text())
    rounds = metrics["detector"]["rounds"]
    assert rounds[-1]["ap50"] >= DETECTOR_AP50_MIN and rounds[-1]["ap"] >= DETECTOR_AP_MIN
    assert rounds[-1]["class_aware"]["ap50"] >= CLASS_AWARE_AP50_MIN  # the prompt's class, learned
    assert metrics["splits"]["ood"]["detector"][-1]["ap50"] >= OOD_AP50_MIN


@pytest.mark.slow
def test_a_metric_that_falls_posts_the_webhook_and_the_trends_show_it(trained, tmp_path, webhook, monkeypatch):
    """Two runs of evaluate with the same params (the first restored from
    DVC's run-cache), the second after a code change that shifts the
    detector's boxes by 8 px (an injected regression).  Its AP50 falls by more
    than alerts.max_drop: the webhook hears which metric, from what to what;
    the trends picture holds both runs."""
    import numpy as np

    import tasks.evaluate
    from mirage.run import trends

    project = tmp_path / "project"
    shutil.copytree(trained, project, symlinks=True)
    url, received = webhook
    earlier = len(trends.history(project, None))  # the finished and the trained project's runs
    write_overrides(project / "params.yaml", {"alerts.webhook": url, "alerts.max_drop": 0.1})
    (project / "metrics/evaluate.json").unlink()  # evaluate is stale, the params are as they were
    assert cli_main(["--root", str(project), "run"]) == 0
    assert received == []  # the first run of these params: nothing to compare with
    real = tasks.evaluate.predict

    def shifted(*args, **kwargs):
        out = real(*args, **kwargs)
        for d in out:
            d["boxes"] = d["boxes"] + np.array([8, 8, 0, 0], dtype=d["boxes"].dtype)
        return out

    monkeypatch.setattr(tasks.evaluate, "predict", shifted)  # what this process runs (stages run in-process)
    with (project / "tasks" / "evaluate.py").open("a") as code:  # and what DVC sees: evaluate's code changed
        code.write("\n# the boxes shifted by 8 px (a regression injected by the test)\n")
    assert cli_main(["--root", str(project), "run"]) == 0
    runs = trends.history(project, None)[earlier:]
    assert len(runs) == 2 and runs[0]["params"] == runs[1]["params"]
    fell = {r["metric"]: r for r in received}
    assert "test: detector AP50" in fell and "discovery CorLoc" not in fell  # discovery did not change
    drop = fell["test: detector AP50"]
    assert drop["old"] == runs[0]["metrics"]["test: detector AP50"] and drop["new"] == runs[1]["metrics"]["test: detector AP50"]
    assert drop["old"] - drop["new"] > 0.1 and drop["cause"] == "metric drop" and "fell from" in drop["text"]
    assert drop["compared_with"] == runs[0]["flow_run"] and drop["flow_run"] == runs[1]["flow_run"]
    latest = api("/flow_runs/filter", {"flows": {"name": {"any_": ["mirage-pipeline"]}}, "sort": "START_TIME_DESC",
                                       "limit": 1})[0]
    found = {a["key"]: a for a in artifacts_of([latest["id"]])}
    width, height = png_size(found["mirage-trends"]["data"])
    assert width >= 800 and height >= 400
    assert "## Over the last runs" in found["mirage-summary"]["data"]
    (tmp_path / "trends.png").write_bytes(base64.b64decode(found["mirage-trends"]["data"].split(",", 1)[1]))


def test_editing_runtime_code_leaves_every_stage_up_to_date(project, capsys):
    """mirage/run/ only runs and reports: no stage depends on it.  Core code
    (the store) is a dep of every data stage, so editing it is seen."""
    for runtime in ("server.py", "stage.py", "locks.py", "faults.py", "runner.py", "report.py", "scheduler.py"):
        with open(project / "mirage/run" / runtime, "a") as f:
            f.write("\n# edited: how runs are reported or guarded\n")
    assert scheduler.stale(project) == {}
    assert cli_main(["--root", str(project), "status"]) == 0
    assert "nothing stale" in capsys.readouterr().out
    with open(project / "mirage/data/store.py", "a") as f:
        f.write("\n# edited: what decides the stages' bytes\n")
    assert {"toyworld", "import", "generate", "features", "discover", "train_detector", "evaluate"} <= set(scheduler.stale(project))


def test_nothing_stale_runs_nothing(project, capsys):
    assert ran(pipeline.run(project)) == []
    assert scheduler.stale(project) == {}
    assert cli_main(["--root", str(project), "status"]) == 0
    assert "nothing stale" in capsys.readouterr().out


@pytest.mark.slow
def test_one_key_change_status_names_it_and_what_runs_and_only_that_reruns(project, capsys):
    text = (project / "params.yaml").read_text().replace("tau: 0.8", "tau: 0.3")
    (project / "params.yaml").write_text(text)
    assert cli_main(["--root", str(project), "status"]) == 0
    out = capsys.readouterr().out
    assert "discover: stale\n  param discover.tau: 0.8 -> 0.3\n" in out
    assert "discover_splits: stale\n  param discover.tau: 0.8 -> 0.3\n" in out  # the teacher on the splits too
    assert "then, as their inputs change: train_detector, evaluate\n" in out
    status = scheduler.explain(project)
    before = {p.name: p.read_bytes() for p in (project / "data/features").glob("*.parquet")}
    again = pipeline.run(project)
    assert set(ran(again)) == set(status.stale) | set(status.downstream) == {"discover", "train_detector", "discover_splits",
                                                                           "evaluate"}
    assert before == {p.name: p.read_bytes() for p in (project / "data/features").glob("*.parquet")}


def test_set_keeps_params_yaml_as_written(project):
    """`-S` edits one value: comments, nulls, quotes and anchors stay."""
    text = (project / "params.yaml").read_text()
    pipeline.run(project, {"evaluate.grid_images": 8})
    after = (project / "params.yaml").read_text()
    assert after == text.replace("grid_images: 4", "grid_images: 8")


def test_dvc_yaml_parsed_once_hands_out_independent_copies_that_write_back_the_same_bytes(done):
    """scheduler parses each text DVC reads once per process: every caller
    gets its own copy (a change to one is not seen by the next), equal to a
    fresh parse, and a round-trip copy dumps dvc.lock's exact bytes."""
    import io

    from dvc.utils.serialize import _yaml

    from mirage.run.scheduler import open_repo

    open_repo(done).close()
    assert getattr(_yaml.parse_yaml, "once", False)
    text = (done / "dvc.lock").read_text()
    first = _yaml.parse_yaml(text, "dvc.lock", typ="rt")
    first["stages"]["evaluate"]["cmd"] = "changed"
    second = _yaml.parse_yaml(text, "dvc.lock", typ="rt")
    from ruamel.yaml import YAML

    assert second["stages"]["evaluate"]["cmd"] != "changed" and second == YAML(typ="rt").load(text)
    out = io.StringIO()
    _yaml._dump(second, out)
    assert out.getvalue() == text
    with pytest.raises(_yaml.YAMLFileCorruptedError):
        _yaml.parse_yaml("a: [", "broken.yaml")


@pytest.mark.slow
def test_dvc_repro_alone_runs_a_stage_and_agrees_with_mirage(project):
    """`dvc repro` runs the same stage commands through DVC, each in its own process."""
    before = (project / "dvc.lock").read_text()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "--force", "--single-item", "discover"],
                          cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Running stage 'discover'" in done.stdout
    # same params, same inputs: dvc repro reproduces mirage's outputs byte for byte
    assert (project / "dvc.lock").read_text() == before
    assert scheduler.stale(project) == {}


def test_frozen_models_are_named_when_missing(tiny_project, capsys):
    shutil.rmtree(tiny_project / "models" / "encoder")
    assert cli_main(["--root", str(tiny_project), "run"]) == 2
    err = capsys.readouterr().err
    assert "models/encoder" in err and "mirage train encoder" in err
    assert not (tiny_project / "data").exists()


@pytest.mark.parametrize("override, named", [
    ("discover.tua=0.3", "discover.tua"),
    ("generate.per_prompt=-1", "generate.per_prompt"),
    ("toyworld.object_size=[18, 10]", "toyworld.object_size"),
    ("generate.model=models/no-such-generator", "generate.model"),
    ("features.encoder=models/no-such-encoder", "features.encoder"),
    ("features.encoder=ViT-Q-99:laion", "features.encoder"),
    ("features.encoder=timm:no_such_vit", "features.encoder"),
    ("features.patch_backbone=unet:down_blocks.9.nothing:10", "features.patch_backbone"),
    ("features.patch_backbone=encoder:values", "features.patch_backbone"),
])
def test_bad_override_fails_before_any_work(tiny_project, capsys, override, named):
    params = (tiny_project / "params.yaml").read_bytes()
    assert cli_main(["--root", str(tiny_project), "run", "-S", override]) == 2
    assert named in capsys.readouterr().err
    assert not (tiny_project / "data").exists()
    assert (tiny_project / "params.yaml").read_bytes() == params  # left as it was


@pytest.mark.slow
def test_mirage_train_retrains_a_frozen_model_and_records_it(project):
    """`mirage train encoder` reruns the frozen stage (tiny: 2 steps), records
    it in dvc.lock, and the stages after it rerun on the new model."""
    assert cli_main(["--root", str(project), "train", "encoder"]) == 0
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert "train_encoder" in lock and "train_generator" not in lock
    assert scheduler.stale(project) == {}
    assert cli_main(["--root", str(project), "train", "decoder"]) == 2


@pytest.mark.slow
def test_a_concepts_patch_backbone_and_merged_tokens_run_through_and_back_without_recomputing(done, project):
    """features.patch_backbone: concepts (the matched units of stage concepts'
    pairs), with Token Merging in the encoder (features.tome_r) and cuts on the
    merged graph (discover.on_merged), through discovery and evaluate; back to
    the defaults, features and discover restore their items (nothing
    computed), train_detector, discover_splits and evaluate come from DVC's run-cache: every
    output byte-identical to before."""
    default = load_params(project / "params.yaml").features.patch_backbone
    there = {"features.patch_backbone": "concepts", "features.tome_r": 2, "discover.on_merged": True}
    ran = {r.name: r for r in pipeline.run(project, there) if r.ran}
    assert list(ran) == ["features", "curate", "discover", "train_detector", "discover_splits", "evaluate"]
    assert ran["features"].result["computed"] == 24
    trained = [p for p in pq.read_table(project / "data/concepts/pairs.parquet").to_pylist() if p["condition"] == "trained"]
    channels = sum(len({(p[f"{side}_layer"], p[f"{side}_unit"]) for p in trained}) for side in ("generator", "encoder"))
    assert table_metadata(project / "data/features")["grid"] == f"8,8,{channels}"  # concepts.grid, one channel a unit
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["discovery"]["backbone"] == "concepts" and 0.0 < metrics["discovery"]["corloc"] <= 1.0
    back = {r.name: r for r in pipeline.run(project, {"features.patch_backbone": default, "features.tome_r": 0,
                                                      "discover.on_merged": False}) if r.ran}
    assert back["features"].result["computed"] == 0 and back["discover"].result["computed"] == 0
    assert back["train_detector"].restored and back["discover_splits"].restored and back["evaluate"].restored
    for name in ("metrics/evaluate.json", "data/discovery.coco.json"):
        assert (project / name).read_bytes() == (done / name).read_bytes(), name
