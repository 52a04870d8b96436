"""A pytest plugin: on CI (CI set), a skipped test fails unless its reason is
declared here.  A skip is otherwise a check that silently stopped running
(a tmpfs that cannot be mounted, a browser that is missing)."""
from __future__ import annotations

import os

import pytest

# Skips CI accepts: a test skipped on CI for another reason fails there (a skip
# is otherwise a check that silently stopped running).  Reason fragments:
DECLARED_SKIPS = (
    "needs a CUDA GPU",  # the GPU checks run only where a GPU is lent
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(fragment in reason for fragment in DECLARED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped on CI, and not a declared skip (tests/ci_skips.py DECLARED_SKIPS): {reason}"
