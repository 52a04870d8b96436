"""`mirage server` (a persistent Prefect server and UI), runs that find it,
the dashboard in a real browser, and `mirage serve` running the pipeline on a
schedule by itself.  Every process here is a real one, started as a user
would, on a copy of the finished tiny project."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, UNFROZEN, prefect_api

pytestmark = pytest.mark.slow  # a Prefect server, Chromium, runs

MIRAGE = [sys.executable, "-m", "mirage.cli"]
SHOTS = ROOT / "test-output" / "dashboard"  # screenshots of the browser test (git-ignored)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no Prefect API configured, the venv's python first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {"PREFECT_HOME": str(prefect_home), **extra}


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Server:
    """`mirage server` on a free port for one project, stopped at the end."""

    def __init__(self, root: Path, prefect_home: Path, *args: str, **env: str):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = user_env(prefect_home, **env)
        self.log = open(root.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([*MIRAGE, "--root", str(root), "server", "--port", str(self.port), *args],
                                     cwd=root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 180, f"mirage server on {self.url}")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, (self.root.parent / f"server-{self.port}.log").read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, body: dict | None = None):
        return prefect_api(self.url + "/api" + path, body)

    def pipeline_runs(self, **flow_run_filter) -> list[dict]:
        return self.api("/flow_runs/filter", {"flows": {"name": {"any_": ["mirage-pipeline"]}},
                                              "flow_runs": flow_run_filter, "sort": "START_TIME_DESC"})

    def mirage(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*MIRAGE, "--root", str(self.root), *args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def server(done, tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "project"
    shutil.copytree(done, root, symlinks=True)
    server = Server(root, root.parent / "prefect-home", "--home", ".mirage/prefect")  # a database of its own
    assert (root / ".mirage/prefect/prefect.db").exists() and not (root.parent / "prefect-home/prefect.db").exists()
    yield server
    server.stop()
    assert not (root / ".mirage/server.json").exists()  # the marker goes with the server
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/api/health", timeout=2)  # and no server process stays behind


def chromium(offline: bool = False):
    """Headless Chromium; `offline`: no host name resolves (as on a machine without a network)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,3000", *(["--host-resolver-rules=MAP * ~NOTFOUND"] if offline else [])):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def page_text(driver, url: str, expect: str, timeout: float = 60) -> str:
    driver.get(url)
    return wait_for(lambda: (t := driver.find_element("tag name", "body").text) and expect in t and t,
                    timeout, f"{expect!r} on {url}")


def loaded_images(driver) -> list[int]:
    """naturalWidth of each picture of ours (a data: URL) that finished loading (0: broken)."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => i.complete && i.src.startsWith('data:image/png'))"
        ".map(i => i.naturalWidth)")


def test_a_run_reports_to_the_server_and_the_dashboard_shows_it_in_a_browser(server, zombie):
    # `zombie`: a killed run of another workspace, left to the server's zombie detection while this module runs
    done = server.mirage("run", "-S", "evaluate.grid_images=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "evaluate        ran" in done.stdout
    run = server.pipeline_runs()[0]  # the run went to the persistent server, not a temporary one
    assert run["state_type"] == "COMPLETED" and "profile:toy" in run["tags"]
    found = {a["key"]: a["id"] for a in server.api("/artifacts/filter",
                                                   {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})}
    metrics = json.loads((server.root / "metrics/evaluate.json").read_text())
    corloc = f"{metrics['discovery']['corloc']:.3f}"

    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    try:
        text = page_text(driver, f"{server.url}/v2/runs/flow-run/{run['id']}", run["name"])
        wait_for(lambda: "stage evaluate" in driver.find_element("tag name", "body").text, 60, "the run's log")
        assert {"profile:toy", f"project:{server.root.name}"} <= set(run["tags"])  # the page may fold tags: +N
        driver.save_screenshot(str(SHOTS / "flow-run.png"))

        text = page_text(driver, f"{server.url}/v2/artifacts/artifact/{found['mirage-summary']}", "discovery CorLoc")
        for stage in UNFROZEN:
            assert stage in text
        assert corloc in text
        widths = wait_for(lambda: (w := loaded_images(driver)) and len(w) >= 3 and w, 30, "the summary's pictures")
        assert all(w > 0 for w in widths), widths  # the pictures, lineage included, rendered from their data: URLs
        driver.save_screenshot(str(SHOTS / "summary.png"))
        lineage = driver.find_element("css selector", "img[alt='lineage']")
        assert lineage.size["width"] >= 600, lineage.size  # shown at a readable width
        lineage.screenshot(str(SHOTS / "lineage.png"))
        trends = driver.find_element("css selector", "img[alt='trends']")  # the finished project's runs so far
        assert trends.size["width"] >= 600, trends.size
        trends.screenshot(str(SHOTS / "trends.png"))
        # the classic UI, which a fresh browser may open, shows the same picture
        page_text(driver, f"{server.url}/artifacts/artifact/{found['mirage-summary']}", "discovery CorLoc")
        wait_for(lambda: (w := loaded_images(driver)) and len(w) >= 3 and w, 30, "the classic UI's pictures")
        driver.save_screenshot(str(SHOTS / "summary-classic-ui.png"))

        page_text(driver, f"{server.url}/v2/artifacts/artifact/{found['mirage-detections']}", "mirage-detections")
        widths = wait_for(lambda: [w for w in loaded_images(driver) if w >= 128], 30, "the detections image")
        assert widths
        driver.save_screenshot(str(SHOTS / "detections.png"))
    finally:
        driver.quit()


def test_a_served_schedule_runs_the_pipeline_by_itself_twice(server):
    before = len(server.pipeline_runs())
    serve = subprocess.Popen([*MIRAGE, "--root", str(server.root), "serve", "--interval", "5",
                              "-S", "evaluate.grid_images=3"], cwd=server.root, env=server.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def two_done():
            runs = [r for r in server.pipeline_runs(state={"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}})
                    if r["deployment_id"]]
            return runs if len(runs) >= 2 else None

        runs = sorted(wait_for(two_done, 420, "two scheduled runs", every=3), key=lambda r: r["start_time"])[:2]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"]
    assert len(server.pipeline_runs()) > before
    stages = [server.api("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [r["id"]]}}})
              for r in runs]
    assert [s["name"] for s in stages[0]] and {s["flow_id"] for s in stages[0]}  # the first run ran a stage
    assert stages[1] == []  # the second found nothing stale
    assert runs[1]["total_run_time"] < 10, runs[1]["total_run_time"]  # ends in about a second
    print(f"scheduled no-op run: {runs[1]['total_run_time']:.2f} s")
    assert "grid_images: 3" in (server.root / "params.yaml").read_text()


def test_serve_without_a_server_says_how_to_get_one(done, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    out = subprocess.run([*MIRAGE, "--root", str(root), "serve", "--interval", "60"], cwd=root,
                         env=user_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "mirage server" in out.stderr


def test_a_run_cancelled_from_the_ui_stops_and_the_next_run_resumes(server):
    """Cancel a served run in the middle of generate (what the UI's Cancel
    does: the state goes to CANCELLING and Prefect ends the run's process);
    then a `mirage run` finishes the job, keeping the batches done before."""
    serve = subprocess.Popen([*MIRAGE, "--root", str(server.root), "serve", "--interval", "3600", "--name", "cancel-me",
                              "-S", "generate.per_prompt=24"], cwd=server.root, env=server.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def deployment():
            try:
                return server.api("/deployments/name/mirage-pipeline/cancel-me")
            except httpx.HTTPStatusError:
                return None

        run = server.api(f"/deployments/{wait_for(deployment, 120, 'the deployment')['id']}/create_flow_run", {})

        def generating():  # the run's generate stage has reported progress
            if server.api(f"/flow_runs/{run['id']}")["state_type"] != "RUNNING":
                return False
            stages = server.api("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
            progress = server.api("/artifacts/filter", {"artifacts": {
                "key": {"any_": ["generate-progress"]}, "flow_run_id": {"any_": [s["id"] for s in stages]}}})
            return any(a["data"] for a in progress)

        wait_for(generating, 300, "the served run in the middle of generate", every=1)
        server.api(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        wait_for(lambda: server.api(f"/flow_runs/{run['id']}")["state_type"] == "CANCELLED", 120, "the cancelled state")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    from mirage.data.store import read_table

    assert read_table(server.root / "data/generated").num_rows == 24  # readers still see the last whole table
    out = server.mirage("run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [p for p in (server.root / "data").rglob("*") if ".tmp-" in p.name or p.name == ".work"] == []
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("generate"))
    computed = int(line.split("(")[1].split(" of ")[0])
    assert 0 < computed < 72 - 24, line  # batches finished before the cancel were kept
    assert "72 items" in line and "kept" in line


@pytest.fixture(scope="module")
def zombie(server, done, tmp_path_factory) -> dict:
    """A `mirage run` reporting to the module's server, SIGKILLed in the
    middle of train_detector, that no other run follows.  Started by the
    module's first test, so that the minute Prefect takes to notice passes
    while the other tests run."""
    from datetime import datetime, timezone

    root = tmp_path_factory.mktemp("zombie") / "project"  # its own workspace: the module's project stays free
    shutil.copytree(done, root, symlinks=True)
    release = root.parent / "release"
    env = server.env | {"PREFECT_API_URL": f"{server.url}/api", "MIRAGE_FAULT": "train-step@3:wait",
                        "MIRAGE_FAULT_RELEASE": str(release)}
    run = subprocess.Popen([*MIRAGE, "--root", str(root), "run", "-S", "train_detector.steps=9"], cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: Path(f"{release}.waiting").exists() or run.poll() is not None, 300, "train_detector")
        assert run.poll() is None
        run.send_signal(signal.SIGKILL)
        killed_at = datetime.now(timezone.utc)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    runs = server.api("/flow_runs/filter", {"flow_runs": {"tags": {"all_": [f"pid:{run.pid}"]}}})
    assert sorted(r["state_type"] for r in runs) == ["RUNNING", "RUNNING"]  # the pipeline and train_detector
    return {"runs": runs, "killed_at": killed_at}


def test_a_killed_run_reads_crashed_within_a_minute_with_the_server_up(server, zombie):
    """The server's zombie automation (created by `mirage server`) marks the
    killed run and its stage run Crashed from their missing heartbeats,
    within a minute of the kill, with no other run of that workspace."""
    from datetime import datetime

    from mirage.run.liveness import ZOMBIE_AFTER_SECONDS, ZOMBIE_AUTOMATION

    assert [a["name"] for a in server.api("/automations/filter", {})].count(ZOMBIE_AUTOMATION) == 1

    def crashed():
        states = [server.api(f"/flow_runs/{r['id']}") for r in zombie["runs"]]
        return states if all(s["state_type"] == "CRASHED" for s in states) else None

    states = wait_for(crashed, ZOMBIE_AFTER_SECONDS + 90, "both runs Crashed", every=2)
    for s in states:
        assert "no heartbeat" in s["state"]["message"]
        after = (datetime.fromisoformat(s["state"]["timestamp"]) - zombie["killed_at"]).total_seconds()
        print(f"{s['name']} marked Crashed {after:.0f} s after the kill")
        assert 0 < after <= 60  # within a minute
    pipeline_run = next(s for s in states if s["parent_task_run_id"] is None)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    try:  # what a user sees: the classic UI's run page and the V2 runs list
        text = page_text(driver, f"{server.url}/runs/flow-run/{pipeline_run['id']}", "Crashed")
        assert pipeline_run["name"] in text
        driver.save_screenshot(str(SHOTS / "crashed-run.png"))
        page_text(driver, f"{server.url}/v2/runs", "Crashed")
        driver.save_screenshot(str(SHOTS / "crashed-runs-list.png"))
    finally:
        driver.quit()


def test_dvc_plots_render_their_curves_with_the_network_off(done, tmp_path):
    """`dvc plots show` with the project's .dvc/config: the page holds its
    JavaScript (.dvc/plots/offline.html), so the PR curves draw in a browser
    that resolves no host; with DVC's own page (a CDN) they do not."""
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    (root / ".dvc" / "plots").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / "plots" / "offline.html", root / ".dvc" / "plots" / "offline.html")
    dvc = [str(Path(sys.executable).parent / "dvc"), "plots", "show", "-o"]
    assert subprocess.run([*dvc, str(tmp_path / "offline")], cwd=root, capture_output=True).returncode == 0
    (root / ".dvc" / "config").write_text("")  # DVC's default page: vega from a CDN
    assert subprocess.run([*dvc, str(tmp_path / "cdn")], cwd=root, capture_output=True).returncode == 0
    assert "cdn.jsdelivr.net" in (tmp_path / "cdn" / "index.html").read_text()

    def curves(driver):
        return driver.execute_script("return Array.from(document.querySelectorAll('svg.marks'))"
                                     ".filter(s => s.clientWidth > 100).length")

    SHOTS.mkdir(parents=True, exist_ok=True)
    driver = chromium(offline=True)
    try:
        driver.get(f"file://{tmp_path / 'offline' / 'index.html'}")
        assert wait_for(lambda: curves(driver) >= 2, 30, "the PR curves of both rounds")
        driver.save_screenshot(str(SHOTS / "dvc-plots-offline.png"))
        driver.get(f"file://{tmp_path / 'cdn' / 'index.html'}")
        time.sleep(5)
        assert curves(driver) == 0  # the control: no network, no CDN, no curve
    finally:
        driver.quit()
