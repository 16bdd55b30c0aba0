"""The metrics exporter binds loopback outside Kubernetes (issue 28, item 7).

``sweep run`` without a local overlay runs the chart's rendered config, which asks for ``metrics.host: 0.0.0.0``
(right in a pod, where Prometheus scrapes the pod IP). On a laptop that exposed every rank's exporter on port
9500+ to the network. The listening sockets are read from ``/proc/net/tcp{,6}`` (tests/fixtures/sockets.py): what
the kernel really bound."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("helm_python")

from mzsane import metrics
from mzsane.sweep import chart, local
from mzsane.sweep.point import rendered_points
from tests.fixtures.sockets import listening_on

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")


def _exporter_binds(cfg_metrics, tmp_path) -> set[str]:
    cfg_metrics.port = 0  # a free port: the address is what is checked
    sink, target = metrics.make_sink(cfg_metrics, "bind-test", str(tmp_path), world_rank=1)
    try:
        return listening_on(int(target.rsplit(":", 1)[1]))
    finally:
        sink.close()


@pytest.fixture
def point_metrics(tmp_path, monkeypatch):
    """The metrics section of the smoke sweep's point as ``sweep run`` places it, without a local overlay."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv(metrics.METRICS_HOST_ENV, raising=False)
    (point,) = rendered_points(chart.render([str(ROOT / "jobs" / "smoke.yaml")]))
    cfg = local.place(point, str(tmp_path / "data"), str(tmp_path / "state"), write=False).cfg
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"  # what the chart renders for pods
    return cfg.metrics


def test_sweep_run_outside_kubernetes_binds_the_exporter_to_loopback(point_metrics, tmp_path):
    assert _exporter_binds(point_metrics, tmp_path) == {"127.0.0.1"}


def test_inside_a_pod_the_exporter_listens_on_every_interface(point_metrics, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # the kubelet sets it in every pod
    assert _exporter_binds(point_metrics, tmp_path) in ({"0.0.0.0"}, {"::"})


def test_told_otherwise_the_exporter_binds_where_it_is_told(point_metrics, tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.METRICS_HOST_ENV, "0.0.0.0")
    assert _exporter_binds(point_metrics, tmp_path) == {"0.0.0.0"}
    monkeypatch.setenv(metrics.METRICS_HOST_ENV, "127.0.0.3")
    assert _exporter_binds(point_metrics, tmp_path) == {"127.0.0.3"}
