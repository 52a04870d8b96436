"""mirage: synthetic images in, object detectors out."""

__version__ = "0.1.0"

import os as _os

# mirage's Prefect servers are local and private: no telemetry (it also fails
# noisily on machines without a network)
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the first temporary server on a fresh machine creates and migrates its
# SQLite database, which takes longer than Prefect's 20 s default on 2 cores
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# flow runs send a heartbeat every 30 s (Prefect's minimum; its default is 180 s), so
# that a run whose process was killed is marked Crashed (mirage/run/liveness.py)
_os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
