"""Every sweep of jobs/ fits a one-node kind cluster of 8 CPUs / 32 GiB with deploy/values-kind.yaml, one point
at a time, and its Kueue queue (deploy/kueue/queues-kind.yaml) covers and admits what the point requests."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("helm_python")

from mzsane.sweep import chart
from mzsane.sweep.capacity import placeable, point_pods, quantity

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KIND = str(ROOT / "deploy" / "values-kind.yaml")
SWEEPS = sorted(ROOT.glob("jobs/*.yaml"))
GI = 2 ** 30
# one kind node of 8 CPU / 32 GiB, less what kube-system, the KubeRay and Kueue controllers and SeaweedFS
# request there (about 1.4 CPU / 2.2 GiB; rounded up)
KIND_NODE = {"cpu": 8.0 - 2.0, "memory": (32.0 - 4.0) * GI, "ephemeral-storage": 50.0 * GI, "pods": 110.0}


def _rayjobs(*files: str) -> list[dict]:
    return [o for o in chart.render(list(files)) if o["kind"] == "RayJob"]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_point_of_every_sweep_fits_one_kind_node_with_the_kind_overlay(sweep):
    for job in _rayjobs(str(sweep), KIND):
        assert placeable(point_pods(job), [KIND_NODE]) is True, job["metadata"]["name"]
        assert job["spec"]["suspend"] is True  # queued: Kueue admits it when the node has room
        assert "preRunningDeadlineSeconds" not in job["spec"]  # waiting in the queue is not a failure


def test_without_the_overlay_the_large_sweeps_never_fit_a_kind_node():
    """The problem the overlay solves: the grid's and zoo-size's points outgrow one 8-CPU node."""
    for name in ("grid", "zoo-size"):
        job = _rayjobs(str(ROOT / "jobs" / f"{name}.yaml"))[0]
        assert placeable(point_pods(job), [KIND_NODE]) is False, name


def _quota(path: Path) -> dict[str, float]:
    queue = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "ClusterQueue")
    (group,) = queue["spec"]["resourceGroups"]
    quota = {r["name"]: quantity(r["nominalQuota"]) for r in group["flavors"][0]["resources"]}
    assert set(quota) == set(group["coveredResources"])
    return quota


@pytest.mark.parametrize("queue,overlay", [("queues-kind.yaml", [KIND]), ("queues.yaml", [])])
def test_the_queue_covers_every_requested_resource_and_admits_one_point_of_every_sweep(queue, overlay):
    """Kueue blocks a workload that requests a resource its ClusterQueue does not cover (ephemeral-storage
    was missing once), and one that needs more than the quota."""
    quota = _quota(ROOT / "deploy" / "kueue" / queue)
    for sweep in SWEEPS:
        for job in _rayjobs(str(sweep), *overlay):
            need: dict[str, float] = {}
            for pod in point_pods(job):
                for key, value in pod.requests.items():
                    need[key] = need.get(key, 0.0) + value
            uncovered = {k for k, v in need.items() if v > 0} - set(quota)
            assert not uncovered, f"{queue} does not cover {uncovered} ({sweep.name})"
            assert all(need[k] <= quota[k] for k in need), (sweep.name, need, quota)
