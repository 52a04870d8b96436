"""What a pipeline run shows on the Prefect dashboard (tags, summary, metrics
table, pictures, progress, assets), and what a failed run tells: the state
message and the webhook alert.  Read back from the session's Prefect server."""
from __future__ import annotations

import json
import time

import pytest
from conftest import UNFROZEN, api, artifacts_of, png_size, prefect_api

from mirage.cli import main as cli_main
from mirage.data import params as params_mod

pytestmark = pytest.mark.slow  # Chromium and failing runs

OUTPUTS = {  # DVC outputs of the stages that ran, and one upstream asset each must name
    "data/toyworld": None,
    "data/generated": "models/generator",
    "data/features": "data/generated",
    "data/discovery": "data/features",
    "data/discovery.coco.json": "data/features",
    "models/detector": "data/discovery",
    "metrics/evaluate.json": "models/detector",
    "plots/detections.png": "models/detector",
    "plots/pr": "models/detector",
}


def test_a_run_is_tagged_and_reports_summary_metrics_and_pictures(finished):
    params = params_mod.load(finished.root / "params.yaml")
    run = api(f"/flow_runs/{finished.flow_run_id}")
    assert {"commit:none", f"params:{params.digest()[:12]}", "profile:toy"} <= set(run["tags"])  # no git here

    metrics = json.loads((finished.root / "metrics/evaluate.json").read_text())
    corloc = f"{metrics['discovery']['corloc']:.3f}"
    found = {a["key"]: a for a in artifacts_of([finished.flow_run_id])}
    summary = found["mirage-summary"]["data"]
    for stage in UNFROZEN:
        assert f"| {stage} | ran" in summary
    assert "| train_generator | up to date" in summary
    assert f"| discovery CorLoc | {corloc} |" in summary
    lineage = summary.split("## Lineage")[1].split("](")[1].split(")")[0]  # a picture, whatever the UI
    assert png_size(lineage)[0] >= 600
    assert png_size(found["mirage-lineage"]["data"]) == png_size(lineage)
    table = found["mirage-metrics"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"stage": "evaluate", "metric": "discovery CorLoc", "value": corloc} in rows
    assert {"stage": "generate", "metric": "items computed / total", "value": "24 / 24"} in rows
    assert [r["metric"] for r in rows if "AP50, round" in r["metric"]] == [
        "detector AP50, round 0", "detector AP50, round 1", "ood: detector AP50, round 0", "ood: detector AP50, round 1"]
    assert {"stage": "evaluate", "metric": "ood: maskcut AP50",
            "value": f"{metrics['splits']['ood']['discovery']['maskcut']['ap50']:.3f}"} in rows
    fd = f"{metrics['generation']['quality']['fd']:.3f}"
    assert f"| fd (generated vs toyworld train split, N 24) | {fd} |" in summary  # beside the previous run's
    assert "## Generated vs real images" in summary
    concepts = metrics["concepts"]  # stage concepts' controls, in the summary and as a picture
    assert f"| concepts: best buddies, trained | {concepts['trained']['best_buddies']} |" in summary
    assert f"| concepts: best buddies, random | {concepts['random']['best_buddies']} |" in summary
    assert "## Concepts: a generator unit and its encoder best buddy" in summary
    assert {"stage": "concepts", "metric": "items computed / total", "value": "2 / 2"} in rows  # its two chunks
    for key in ("mirage-discoveries", "mirage-detections", "mirage-lineage", "mirage-quality", "mirage-concepts"):
        width, height = png_size(found[key]["data"])
        assert width >= 128 and height >= 32


def test_long_stages_report_progress_to_the_end(finished):
    children = api("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [finished.flow_run_id]}}})
    assert {c["name"] for c in children} and len(children) == len(UNFROZEN)
    progress = {a["key"]: a["data"] for a in artifacts_of([c["id"] for c in children]) if a["type"] == "progress"}
    for key in ("generate-progress", "features-progress", "discover-progress",
                "train-detector-round-0-progress", "train-detector-round-1-progress"):
        assert progress[key] == pytest.approx(100.0), key


def test_every_output_is_an_asset_with_its_upstream_assets_and_facts(finished):
    root_uri = finished.root.resolve().as_uri()
    want = {f"{root_uri}/{path}" for path in OUTPUTS}
    deadline = time.monotonic() + 60  # events reach the database asynchronously
    while True:
        events = api("/events/filter", {"filter": {"event": {"prefix": ["prefect.asset.materialization"]},
                                                   "resource": {"id_prefix": [root_uri + "/"]}},
                                        "limit": 50})["events"]
        ours = {e["resource"]["prefect.resource.id"]: e for e in events
                if e["resource"]["prefect.resource.id"].startswith(root_uri + "/")}
        if want <= set(ours) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert want <= set(ours), sorted(want - set(ours))
    for path, upstream in OUTPUTS.items():
        event = ours[f"{root_uri}/{path}"]
        related = {r["prefect.resource.id"] for r in event["related"] if r.get("prefect.resource.role") == "asset"}
        if upstream:
            assert f"{root_uri}/{upstream}" in related, (path, related)
        assert event["payload"]["bytes"] > 0 and event["payload"]["params_digest"]
    assert ours[f"{root_uri}/data/generated"]["payload"]["rows"] == 24
    assert ours[f"{root_uri}/data/toyworld"]["payload"]["rows"] == 48 + 40 + 24  # train, test, ood


def test_a_failed_run_names_stage_items_and_cause_and_posts_the_webhook(project, webhook, monkeypatch, capsys):
    import tasks.generate
    from mirage.data.store import read_table

    url, received = webhook
    params_mod.write_overrides(project / "params.yaml", {"alerts.webhook": url})

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the sampler blew up")

    monkeypatch.setattr(tasks.generate, "sample", broken)
    assert cli_main(["--root", str(project), "run", "-S", "generate.per_prompt=9"]) == 1
    err = capsys.readouterr().err
    assert "stage generate failed: RuntimeError: injected: the sampler blew up" in err
    assert "items " in err and "in the batch" in err  # the batch's item keys
    assert len(received) == 1
    assert received[0]["stage"] == "generate" and "injected" in received[0]["cause"]
    failed = api("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}},
                                       "flows": {"name": {"any_": ["mirage-pipeline"]}},
                                       "sort": "START_TIME_DESC", "limit": 1})[0]
    assert "stage generate failed" in failed["state"]["message"]
    assert read_table(project / "data/generated").num_rows == 24  # nothing finished before was lost


def test_a_webhook_that_is_not_a_url_is_refused_before_any_work(project, capsys):
    before = (project / "params.yaml").read_text()
    assert cli_main(["--root", str(project), "run", "-S", "alerts.webhook=slack"]) == 2
    assert "alerts.webhook" in capsys.readouterr().err
    assert (project / "params.yaml").read_text() == before


def test_a_run_beside_another_is_turned_away_with_a_message(project, capsys):
    import subprocess
    import sys

    holder = subprocess.Popen(  # another pipeline run (or `dvc repro`) holding DVC's repo lock
        [sys.executable, "-c", "import sys, time; from dvc.repo import Repo; r = Repo('.'); r.lock.lock(); "
                               "print('locked', flush=True); time.sleep(60)"],
        cwd=project, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (project / "dvc.lock").read_text()
        assert cli_main(["--root", str(project), "run", "--force"]) == 2
        assert "another pipeline run or `dvc repro` is using" in capsys.readouterr().err
        assert (project / "dvc.lock").read_text() == before
    finally:
        holder.kill()


def test_a_killed_run_reads_crashed_after_the_next_run(project, tmp_path):
    """`mirage run` SIGKILLed in the middle of train_detector (its child flow
    run open): both runs still read Running, as nothing could tell Prefect;
    the next `mirage run` on the workspace marks them Crashed, saying why."""
    import os
    import signal
    import subprocess
    import sys

    from mirage.run.liveness import workspace_id
    from mirage.run.server import configured_api

    api = configured_api()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRAGE_FAULT")}
    env |= {"PREFECT_API_URL": api, "MIRAGE_FAULT": "train-step@3"}
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen([sys.executable, "-m", "mirage.cli", "--root", str(project), "run",
                                   "-S", "train_detector.steps=9"], cwd=project, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        assert killed.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]

    def workspace_runs() -> list[tuple[str, dict]]:
        runs = prefect_api(api + "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [
            f"workspace:{workspace_id(project)}"]}}})
        flows = {f["id"]: f["name"] for f in prefect_api(api + "/flows/filter", {})}
        return sorted(((flows[r["flow_id"]], r) for r in runs), key=lambda nr: (nr[0], nr[1]["start_time"] or ""))

    dead = workspace_runs()
    assert [(name, r["state_type"]) for name, r in dead] == [("mirage-pipeline", "RUNNING"),
                                                             ("train_detector", "RUNNING")]
    assert {f"project:{project.name}", f"pid:{killed.pid}"} <= set(dead[0][1]["tags"]) & set(dead[1][1]["tags"])
    assert cli_main(["--root", str(project), "run"]) == 0  # finishes the job, and tells the dashboard
    for name, run in dead:
        now = prefect_api(api + f"/flow_runs/{run['id']}")
        assert now["state_type"] == "CRASHED", (name, now["state_type"])
        message = now["state"]["message"]
        assert f"its process (pid {killed.pid}) is gone: killed" in message and str(project) in message
    new = [(name, r["state_type"]) for name, r in workspace_runs() if r["id"] not in {d["id"] for _, d in dead}]
    assert new == [("evaluate", "COMPLETED"), ("mirage-pipeline", "COMPLETED"), ("train_detector", "COMPLETED")]


def test_ctrl_c_in_the_cuts_stops_within_seconds_and_a_second_exits_at_once(project, tmp_path):
    """`mirage run` held in the cuts (its 30th: discover's 24 and those of
    discover_splits, which runs beside it, more than 60) gets Ctrl-C: it stops at the next cut, within 5 s, exit 130, its
    runs Cancelled on the dashboard.  Held again, two Ctrl-C: it exits at
    once, cleanly (130, no abort).  The next run finishes the job."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from mirage.run import scheduler
    from mirage.run.liveness import workspace_id
    from mirage.run.server import configured_api

    api = configured_api()

    def held(name: str, tau: float):
        release = tmp_path / f"{name}.release"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRAGE_FAULT")}
        env |= {"PREFECT_API_URL": api, "MIRAGE_FAULT": "cut@30:wait", "MIRAGE_FAULT_RELEASE": str(release)}
        proc = subprocess.Popen([sys.executable, "-m", "mirage.cli", "--root", str(project), "run",
                                 "-S", f"discover.tau={tau}"], cwd=project, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while not Path(f"{release}.waiting").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        return proc, release

    from datetime import datetime, timezone

    proc, release = held("once", 0.7)
    start, interrupted = time.monotonic(), datetime.now(timezone.utc)
    proc.send_signal(signal.SIGINT)
    release.touch()  # the cut it was in ends; the next one sees the stop
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.monotonic() - start < 30  # the process, Prefect's exit included
    assert "stopping at the next item or step" in err and "marked Cancelled" in err
    runs = prefect_api(api + "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [
        f"workspace:{workspace_id(project)}", f"pid:{proc.pid}"]}}})
    flows = {f["id"]: f["name"] for f in prefect_api(api + "/flows/filter", {})}
    states = {flows[r["flow_id"]]: r["state"] for r in runs}
    assert states["mirage-pipeline"]["type"] == states["discover_splits"]["type"] == "CANCELLED", states
    assert "evaluate" not in states  # nothing after the stopped stages started
    stopped = datetime.fromisoformat(states["mirage-pipeline"]["timestamp"]) - interrupted
    print(f"stopped and marked Cancelled {stopped.total_seconds():.1f} s after Ctrl-C")
    assert stopped.total_seconds() < 5  # the run: its stages ended, its state says so

    proc, release = held("twice", 0.6)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "second Ctrl-C: exiting now" in err, err[-3000:]
    assert "terminate called" not in err and "Aborted" not in err

    assert cli_main(["--root", str(project), "run"]) == 0  # tau 0.6 as written: the stages finish
    assert scheduler.stale(project) == {}
