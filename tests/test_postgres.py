"""PostgreSQL as the dashboard's database: a real server started here
(initdb + pg_ctl in a temporary directory, on a local port), `mirage server`
pointed at it through Prefect's own setting, a tiny pipeline run, and the run
read back from the database."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_server import Server, free_port

pytestmark = pytest.mark.slow  # a PostgreSQL server


def pg_tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} not found: install Debian's postgresql (tests/system_packages.sh does)")
    return found[-1]


def as_db_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    home = Path(tempfile.mkdtemp(prefix="mirage-pg-", dir="/tmp"))  # reachable by the postgres user
    data, port = home / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    home.chmod(0o755)
    subprocess.run(as_db_user([pg_tool("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
                   check=True, capture_output=True)
    subprocess.run(as_db_user([pg_tool("pg_ctl"), "-D", str(data), "-w", "-l", str(home / "log"),
                               "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        yield port
    finally:
        subprocess.run(as_db_user([pg_tool("pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"]),
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def psql(port: int, sql: str) -> str:
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                          "-tAc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_the_dashboard_on_postgresql_keeps_the_run(done, tmp_path, postgres):
    root = tmp_path / "project"
    shutil.copytree(done, root, symlinks=True)
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{postgres}/postgres"
    server = Server(root, tmp_path / "prefect-home", PREFECT_API_DATABASE_CONNECTION_URL=url)
    try:
        out = server.mirage("run", "-S", "evaluate.grid_images=2")
        assert out.returncode == 0, out.stderr[-3000:]
    finally:
        server.stop()
    rows = psql(postgres, "select fr.state_type, fr.tags::text from flow_run fr join flow f on f.id = fr.flow_id "
                          "where f.name = 'mirage-pipeline'")
    assert rows.startswith("COMPLETED|") and "profile:toy" in rows, rows
    assert psql(postgres, "select count(*) from artifact where key = 'mirage-summary'") == "1"
