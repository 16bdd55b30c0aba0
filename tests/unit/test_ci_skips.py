"""Under CI=true a skip that hides a missing dependency fails the run; elsewhere it skips with its reason."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAMPLE = '''
import pytest
from tests.conftest import requires

def test_requires():
    requires("the thing", False, "pip install thing")

def test_importorskip():
    pytest.importorskip("no_such_module_mzsane")

def test_other_skip():
    pytest.skip("needs a GPU")

def test_passes():
    pass
'''


def _run(tmp_path, ci: str | None) -> str:
    path = tmp_path / "test_sample.py"
    path.write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "tests.conftest",
           "--rootdir", str(tmp_path), str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.stdout


def test_dependency_skips_fail_under_ci_and_say_why(tmp_path):
    out = _run(tmp_path, "true")
    assert "2 failed, 1 passed, 1 skipped" in out, out
    assert "FAILED" in out and "missing dependency: the thing; pip install thing" in out
    assert "no_such_module_mzsane" in out and "SKIPPED [1]" in out and "needs a GPU" in out


def test_dependency_skips_only_skip_outside_ci(tmp_path):
    for ci in (None, "false"):
        out = _run(tmp_path, ci)
        assert "1 passed, 3 skipped" in out, out
        assert "missing dependency: the thing" in out  # -ra prints every skip's reason
