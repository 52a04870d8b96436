"""The suite's own rules: a skip on CI is a failure unless declared."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, ci: bool) -> str:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_silent():\n    pytest.skip('cannot mount a tmpfs here (needs root)')\n"
        "def test_declared():\n    pytest.skip('needs a CUDA GPU')\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)} | ({"CI": "true"} if ci else {})
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / "test_skips.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    return done.stdout


def test_a_skip_on_ci_fails_unless_declared(tmp_path):
    assert "1 failed, 1 skipped" in run_pytest(tmp_path, ci=True)
    assert "not a declared skip" in run_pytest(tmp_path, ci=True)
    assert "2 skipped" in run_pytest(tmp_path, ci=False)  # a developer's machine may lack root or a GPU
