"""Shared test set-up: real servers on loopback come from the fixture plugins below.

Dependency skips: a test that needs something the project installs (a package of the test extra, the
SeaweedFS binary, Prometheus, the KubeRay CRDs) calls ``requires(...)``; it skips on a developer machine
that lacks it and FAILS when ``CI`` is set (``CI=true``), so a broken install can never pass CI as a row of
skips. Skips raised any other way whose reason names a missing import or binary (``pytest.importorskip``,
"... not found") are turned into failures under CI by the hooks below as well. ``-ra`` (pyproject.toml)
prints the reason of every skip in the summary.

No test may send anything beyond loopback: without credentials the AWS SDK would ask the cloud
instance-metadata address, so that lookup is disabled for the whole session.
"""
from __future__ import annotations

import os
import re

import pytest

from mzsane.loopback.ray_cluster import PROCESS_TOKEN

pytest_plugins = ["tests.fixtures.s3", "tests.fixtures.prometheus", "tests.fixtures.ray_cluster",
                  "tests.fixtures.operator"]

os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # botocore: never query 169.254.169.254
# Ray caches the first auth token a process uses: every Ray instance this test process starts or joins
# (fixture clusters, loopback benchmark clusters, the local instance `mzsane train` starts) shares one token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = PROCESS_TOKEN

MISSING = "missing dependency"
_MISSING_RE = re.compile(r"missing dependency|could not import|no module named|not found", re.IGNORECASE)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def requires(what: str, available: bool, fix: str) -> None:
    """Skip (fail under CI) unless ``available``: ``what`` is the dependency, ``fix`` how to install it."""
    if available:
        return
    reason = f"{MISSING}: {what}; {fix}"
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dependency fails)", pytrace=False)
    pytest.skip(reason)


def _dependency_skip(report) -> str | None:
    """The reason of a skip that hides a missing dependency, else None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2])
    return reason if _MISSING_RE.search(reason) else None


def _fail_under_ci(report) -> None:
    reason = _dependency_skip(report) if in_ci() else None
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"{reason} (CI=true: a skip for a missing dependency fails)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Module-level ``pytest.importorskip`` skips the whole file at collection."""
    outcome = yield
    _fail_under_ci(outcome.get_result())
