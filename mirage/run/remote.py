"""Share data between clones: `mirage push` / `mirage pull` over a DVC remote.

DVC does the work (`dvc push` / `dvc pull` do the same); these name the
remote that is missing and say what a pull left stale.  The toy models are
committed in git (cache: false), so only data and the trained detector move.
"""
from __future__ import annotations

from pathlib import Path

from mirage.run.scheduler import PipelineError, open_repo, stale

NO_REMOTE = ("no DVC remote is configured: add one with `dvc remote add -d storage /path/to/folder` "
             "(or s3://bucket/path, ssh://host/path; README, Shared data) and commit .dvc/config")


def _remote_error(err: Exception) -> PipelineError:
    return PipelineError(NO_REMOTE if type(err).__name__ == "NoRemoteError" else f"{type(err).__name__}: {err}")


def push(root: Path, remote: str | None = None, jobs: int | None = None) -> int:
    """Upload every output dvc.lock records to the remote; returns files sent."""
    with open_repo(root) as repo:
        try:
            return repo.push(remote=remote, jobs=jobs)
        except Exception as err:
            if type(err).__module__.startswith("dvc"):
                raise _remote_error(err) from err
            raise


def pull(root: Path, remote: str | None = None, jobs: int | None = None) -> tuple[int, dict[str, list[str]]]:
    """Download and check out what dvc.lock records; returns (files fetched,
    what is still stale: `mirage run` runs only that)."""
    with open_repo(root) as repo:
        try:
            stats = repo.pull(remote=remote, jobs=jobs)
        except Exception as err:
            if type(err).__module__.startswith("dvc"):
                raise _remote_error(err) from err
            raise
    return int(stats.get("stats", stats).get("fetched", 0)), stale(root)
