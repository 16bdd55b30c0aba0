"""A point's pods against the nodes' allocatable resources (mzsane/sweep/capacity.py), as a scheduler sees them."""
from __future__ import annotations

import pytest

from mzsane.sweep.capacity import Pod, placeable, pod_requests, point_pods, quantity, unschedulable

GI = 2 ** 30


def test_quantities_read_like_kubernetes():
    assert quantity("500m") == 0.5 and quantity(2) == 2 and quantity("1.5") == 1.5
    assert quantity("8Gi") == 8 * GI and quantity("512Mi") == 512 * 2 ** 20 and quantity("1G") == 1e9
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity("1 core")


def test_a_pod_requests_its_containers_sum_or_its_largest_init_container_and_limits_stand_in():
    spec = {"containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
                           {"resources": {"limits": {"cpu": "500m", "nvidia.com/gpu": "1"}}}],
            "initContainers": [{"resources": {"requests": {"cpu": "200m", "memory": "4Gi"}}}]}
    assert pod_requests(spec) == {"cpu": 1.5, "memory": 4 * GI, "nvidia.com/gpu": 1}


def _job(head_cpu: str, worker_cpu: str, replicas: int) -> dict:
    def template(cpu: str) -> dict:
        return {"spec": {"containers": [{"resources": {"requests": {"cpu": cpu, "memory": "8Gi"}}}]}}
    return {"kind": "RayJob", "metadata": {"name": "p"}, "spec": {
        "submissionMode": "K8sJobMode", "submitterPodTemplate": template("500m"),
        "rayClusterSpec": {"headGroupSpec": {"template": template(head_cpu)},
                           "workerGroupSpecs": [{"groupName": "workers", "replicas": replicas,
                                                 "template": template(worker_cpu)}]}}}


def test_a_point_is_its_head_every_worker_replica_and_the_submitter():
    pods = point_pods(_job("2", "4", 3))
    assert [p.role for p in pods] == ["head", "workers", "workers", "workers", "submitter"]
    assert sum(p.requests["cpu"] for p in pods) == 2 + 3 * 4 + 0.5


def test_placement_needs_one_node_per_pod_with_room_for_all_of_them_at_once():
    pods = [Pod("a", {"cpu": 4}), Pod("b", {"cpu": 4}), Pod("c", {"cpu": 3})]
    assert placeable(pods, [{"cpu": 8}, {"cpu": 3}]) is True
    assert placeable(pods, [{"cpu": 8}, {"cpu": 2}]) is False  # 11 CPUs do not fit 10
    assert placeable([Pod("gpu", {"cpu": 1, "nvidia.com/gpu": 1})], [{"cpu": 8}]) is False  # no GPU on the node
    # first-fit decreasing puts both 3s on one node and strands a 2; the search finds 3+2+2 on each
    tight = [Pod(str(i), {"cpu": c}) for i, c in enumerate([3, 3, 2, 2, 2, 2])]
    assert placeable(tight, [{"cpu": 7}, {"cpu": 7}]) is True


def test_unschedulable_names_the_point_its_pods_and_the_fix():
    nodes = [{"cpu": 8.0, "memory": 32.0 * GI}]
    assert unschedulable([_job("1", "2", 2)], nodes) == ""
    message = unschedulable([_job("2", "4", 2)], nodes)
    assert message.startswith("point p can never be scheduled") and "workers (4 CPU, 8Gi memory)" in message
    assert "deploy/values-kind.yaml" in message and "\n" not in message
    assert unschedulable([_job("2", "4", 2)], []) == ""  # no node visible: nothing to check against
