"""The project's persistent Prefect server (`mirage server`) and how runs find it.

`mirage server` runs Prefect's own server (API + UI, its embedded SQLite under
PREFECT_HOME, or PostgreSQL through PREFECT_API_DATABASE_CONNECTION_URL) on
127.0.0.1 in the foreground and records its URL in `.mirage/server.json`.
Every mirage process of the project (`mirage run`, a stage command under
`dvc repro`, a scheduled run) calls `connect()`: while that server answers, it
reports there; otherwise Prefect starts its temporary server as before.  A
Prefect API already configured (PREFECT_API_URL, a profile, a test harness)
always wins.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

MARKER = Path(".mirage") / "server.json"


def running(root: str | Path = ".") -> str | None:
    """The API URL of the project's `mirage server` if it is up, else None."""
    marker = Path(root) / MARKER
    try:
        url = json.loads(marker.read_text())["api_url"]
    except (OSError, ValueError, KeyError):
        return None
    import httpx

    try:
        return url if httpx.get(f"{url}/health", timeout=2.0).status_code == 200 else None
    except httpx.HTTPError:
        return None


def configured_api() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def connect(root: str | Path = ".", temporary: bool = True) -> str | None:
    """Report this process's flow runs to the project's server when one is up.
    Returns the API URL runs report to, or None when there is no server but
    a temporary one: started here (with `temporary`) so that it ends with
    this process, even when this process is killed."""
    url = configured_api()
    if url:
        return url
    url = running(root)
    if url:
        _use_api(url)  # stage processes started from here inherit it
    elif temporary:
        start_temporary_server()
    return url


def _use_api(url: str) -> None:
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def start_temporary_server() -> str | None:
    """Prefect's temporary server (what a flow starts when no API is
    configured), started now from this thread with Linux's parent-death
    signal: when this process dies, even by SIGKILL, the server ends too
    instead of living on orphaned.  Prefect stops it at a normal exit.  Only
    from the main thread (the signal fires when the starting thread ends);
    elsewhere Prefect starts its own when a flow needs it."""
    import threading
    import types

    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    from prefect.server.api import server as prefect_server

    def popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return subprocess.Popen(*args, **kwargs)

    temp = prefect_server.SubprocessASGIServer()
    real = prefect_server.subprocess
    prefect_server.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})  # its one Popen call
    try:
        temp.start()
    finally:
        prefect_server.subprocess = real
    _use_api(temp.api_url)
    return temp.api_url


def run_server(root: str | Path, host: str, port: int, home: str | Path | None = None) -> int:
    """Run `prefect server start` in the foreground until interrupted; with
    `home`, its database lives there (relative to the project root)."""
    from mirage.data.store import atomic_write_json

    root = Path(root).resolve()
    api = f"http://{host}:{port}/api"
    if running(root):
        print(f"mirage server: already running for {root}: {api.removesuffix('/api')}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)  # the server is the API; a client setting would point it elsewhere
    env["PREFECT_UI_API_URL"] = api  # the UI calls this API (its default is 127.0.0.1:4200 whatever the port)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if home:
        home = root / home
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)  # its SQLite database: this project's runs only
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server too, and removes the marker
    atomic_write_json(root / MARKER, {"api_url": api, "ui_url": api.removesuffix("/api"), "pid": proc.pid})
    print(f"mirage server: dashboard at http://{host}:{port} (API {api}); "
          f"`mirage run`, `dvc repro` and `mirage serve` in {root} report here. Ctrl-C stops it.", flush=True)
    import threading

    threading.Thread(target=_when_up, args=(api, proc), daemon=True).start()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        marker = root / MARKER
        if marker.exists() and json.loads(marker.read_text()).get("pid") == proc.pid:
            marker.unlink()


def _when_up(api: str, proc: subprocess.Popen) -> None:
    """Once the server answers: the automation that marks a run whose process
    died Crashed (mirage/run/liveness.py)."""
    import time

    import httpx

    from mirage.run.liveness import ensure_zombie_automation

    while proc.poll() is None:
        try:
            if httpx.get(f"{api}/health", timeout=2.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        return
    try:
        ensure_zombie_automation(api)
    except Exception as err:  # the dashboard works without it: runs are still marked by the next run
        print(f"mirage server: could not create the zombie-run automation ({type(err).__name__}: {err})",
              file=sys.stderr, flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In the server's process: end when `mirage server` ends, even by kill -9
    (Linux's parent-death signal), so no server is left behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
