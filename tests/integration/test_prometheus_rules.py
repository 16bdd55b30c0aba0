"""The alerting and recording rules of deploy/prometheus/ are valid (``promtool check rules``) and behave as
their unit tests say (``promtool test rules``): every alert both fires on its failure and stays quiet on a
healthy or finished run."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import requires

pytestmark = [pytest.mark.integration]

RULES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "prometheus")
# Debian's binary (package prometheus); without root, `make setup` unpacks it under $MZSANE_DEB_ROOT
_UNPACKED = os.path.join(os.environ.get("MZSANE_DEB_ROOT") or "/nonexistent", "usr/bin/promtool")
PROMTOOL = shutil.which("promtool") or (_UNPACKED if os.path.exists(_UNPACKED) else "/usr/bin/promtool")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    requires("promtool binary", os.access(PROMTOOL, os.X_OK), "make setup (Debian package prometheus)")
    return subprocess.run([PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_rules_are_valid():
    done = _promtool("check", "rules", "rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rule_unit_tests_pass():
    done = _promtool("test", "rules", "rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet():
    with open(os.path.join(RULES_DIR, "rules.yml"), encoding="utf-8") as fh:
        rules = yaml.safe_load(fh)
    with open(os.path.join(RULES_DIR, "rules.test.yml"), encoding="utf-8") as fh:
        tests = yaml.safe_load(fh)
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"MzsaneTrainingStalled", "MzsaneNonFiniteLoss", "MzsaneDataWaitHigh", "MzsaneRankDown",
            "MzsaneCheckpointStale"} <= alerts
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never tested quiet"
