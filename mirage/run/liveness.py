"""Which flow runs on the dashboard are alive: a run whose process died is Crashed.

A process killed by SIGKILL, the OOM killer or a reboot cannot tell Prefect
it ended, so its flow runs (the pipeline run and the stage runs under it)
would read Running forever.  Every run of a workspace carries tags naming it:
`project:<directory name>` (to filter the Runs page by), `workspace:<id>` (the
project's absolute path, hashed: two projects of one name stay apart) and
`pid:<n>` (its process).  Whoever next holds the workspace's run lock (a
`mirage run`, a scheduled run, a stage command under `dvc repro`) knows that
no other run of the workspace is alive, so it marks the workspace's runs
still Running whose process is gone as Crashed, saying so
(`mark_crashed`).  Beside that, with a `mirage server` up, Prefect's own
zombie detection marks them within a minute (flow run heartbeats, and the
automation `mirage server` creates: mirage/run/server.py).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY for mirage's processes (Prefect's minimum)
ZOMBIE_AFTER_SECONDS = 50  # no heartbeat for this long after one (they come every 30 s): the process is dead


def workspace_id(root: str | Path) -> str:
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]


def workspace_tags(root: str | Path) -> list[str]:
    """The tags every flow run of this process on this workspace carries."""
    root = Path(root).resolve()
    return [f"project:{root.name}", f"workspace:{workspace_id(root)}", f"pid:{os.getpid()}"]


def _runs_of(client, root: str | Path, pid: int | None, states) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )

    tags = [f"workspace:{workspace_id(root)}"] + ([f"pid:{pid}"] if pid is not None else [])
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        tags=FlowRunFilterTags(all_=tags), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))


def mark_cancelled(root: str | Path) -> list[str]:
    """This process's runs on the workspace, stopped by Ctrl-C, read
    Cancelled (Prefect records an interrupted flow as Crashed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    marked = []
    with get_client(sync_client=True) as client:
        for run in _runs_of(client, root, os.getpid(), [StateType.RUNNING, StateType.CRASHED, StateType.CANCELLING,
                                                        StateType.PENDING, StateType.FAILED]):
            if run.state and run.state.type == StateType.FAILED and "StageStopped" not in (run.state.message or ""):
                continue  # a stage that failed by itself keeps its failure
            client.set_flow_run_state(run.id, Cancelled(message="stopped by Ctrl-C (finished batches are kept; "
                                                                "the next run resumes)"), force=True)
            marked.append(run.name)
    return marked


def mark_crashed(root: str | Path) -> list[str]:
    """Mark Crashed the workspace's flow runs still Running (or Cancelling)
    whose process is gone; call it holding the run lock, with a Prefect API
    configured.  Returns the names of the runs marked."""
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    marked = []
    with get_client(sync_client=True) as client:
        for run in _runs_of(client, root, None, [StateType.RUNNING, StateType.CANCELLING]):
            pids = [int(t.split(":", 1)[1]) for t in run.tags if t.startswith("pid:") and t[4:].isdigit()]
            if not pids or any(p == os.getpid() or psutil.pid_exists(p) for p in pids):
                continue
            since = run.start_time.strftime("%Y-%m-%d %H:%M:%S UTC") if run.start_time else "its start"
            message = (f"its process (pid {pids[0]}) is gone: killed (SIGKILL, the OOM killer, a reboot) while it "
                       f"ran, since {since}; found by the next run on {Path(root).resolve()}")
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            marked.append(run.name)
    return marked


ZOMBIE_AUTOMATION = "mirage: crash runs whose process died"


def zombie_automation():
    """Prefect's zombie detection (docs: "detect zombie flows"): a flow run
    that sent a heartbeat and then neither another one nor a final state
    within ZOMBIE_AFTER_SECONDS is set Crashed."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    ended = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"flow runs send a heartbeat every {HEARTBEAT_SECONDS} s (mirage sets "
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY); none for "
                    f"{ZOMBIE_AFTER_SECONDS} s and no final state: the process is dead",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat"} | ended,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_SECONDS)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=(
            f"no heartbeat for {ZOMBIE_AFTER_SECONDS} s: its process died (SIGKILL, the OOM killer, a reboot)"))])


def ensure_zombie_automation(api_url: str) -> bool:
    """Create the zombie automation on the server at `api_url` unless it has
    one of that name.  Returns whether it created it."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
        client.create_automation(zombie_automation())
        return True
