"""Whether a sweep point can ever be scheduled: its pods' requests against the nodes' allocatable resources.

Why before submitting: a point whose pods fit no node stays Pending until KubeRay's
``preRunningDeadlineSeconds`` fails it, and again on every retry, with nothing said to the user. A point's
pods (the Ray head, each worker, the submitter Job's pod) are read from the rendered RayJob the way the
scheduler reads them (a pod requests the larger of its containers' sum and its largest init container;
limits stand in for missing requests), and placed on the nodes' allocatable resources first-fit
decreasing, as a scheduler on an empty cluster could. Pure arithmetic: the nodes come from
``sweep/cluster.py``, the only module that talks to Kubernetes.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60}
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
EXHAUSTIVE_MAX_PODS = 8  # beyond this many pods a failed greedy placement is not proof: no refusal


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "8Gi", 2) as a number (cores, bytes, devices)."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


@dataclass(frozen=True)
class Pod:
    role: str  # head | worker group name | submitter
    requests: dict[str, float]


def pod_requests(spec: dict[str, Any]) -> dict[str, float]:
    """What the scheduler reserves for a pod spec: max(sum of containers, largest init container)."""
    def of(container: dict[str, Any]) -> dict[str, float]:
        res = container.get("resources") or {}
        merged = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        return {k: quantity(v) for k, v in merged.items()}

    total: dict[str, float] = {}
    for container in spec.get("containers") or []:
        for key, value in of(container).items():
            total[key] = total.get(key, 0.0) + value
    for container in spec.get("initContainers") or []:
        for key, value in of(container).items():
            total[key] = max(total.get(key, 0.0), value)
    return total


def point_pods(rayjob: dict[str, Any]) -> list[Pod]:
    """The pods a RayJob's point runs at once: the head, every worker replica and the submitter."""
    spec = rayjob.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or {}
    pods = [Pod("head", pod_requests(cluster["headGroupSpec"]["template"].get("spec") or {}))]
    for group in cluster.get("workerGroupSpecs") or []:
        requests = pod_requests(group["template"].get("spec") or {})
        pods += [Pod(str(group.get("groupName", "worker")), requests)] * int(group.get("replicas") or 0)
    if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and spec.get("submitterPodTemplate"):
        pods.append(Pod("submitter", pod_requests(spec["submitterPodTemplate"].get("spec") or {})))
    return pods


def _fits(request: dict[str, float], free: dict[str, float]) -> bool:
    return all(value <= free.get(key, 0.0) + 1e-9 for key, value in request.items() if value > 0)


def _take(request: dict[str, float], free: dict[str, float]) -> None:
    for key, value in request.items():
        free[key] = free.get(key, 0.0) - value


def placeable(pods: list[Pod], nodes: list[dict[str, float]]) -> bool | None:
    """True when the pods can all run at once on ``nodes`` (allocatable per node), False when they never
    can, None when the greedy placement failed on too many pods to prove it by search."""
    order = sorted(pods, key=lambda p: tuple(-p.requests.get(k, 0.0) for k in ("cpu", "memory")))
    free = [dict(n) for n in nodes]
    for pod in order:
        node = next((f for f in free if _fits(pod.requests, f)), None)
        if node is None:
            break
        _take(pod.requests, node)
    else:
        return True
    if len(pods) > EXHAUSTIVE_MAX_PODS:
        return None
    for assignment in itertools.product(range(len(nodes)), repeat=len(pods)):
        free = [dict(n) for n in nodes]
        for pod, index in zip(pods, assignment):
            if not _fits(pod.requests, free[index]):
                break
            _take(pod.requests, free[index])
        else:
            return True
    return False


def _fmt(requests: dict[str, float]) -> str:
    parts = []
    for key, value in sorted(requests.items()):
        if key == "cpu":
            parts.append(f"{value:g} CPU")
        elif key in ("memory", "ephemeral-storage"):
            parts.append(f"{value / 2 ** 30:.3g}Gi {'memory' if key == 'memory' else 'disk'}")
        elif value:
            parts.append(f"{value:g} {key}")
    return ", ".join(parts)


def unschedulable(objects: list[dict[str, Any]], nodes: list[dict[str, float]]) -> str:
    """One line naming the first point that can never run on ``nodes``, or "" when every point can."""
    if not nodes:
        return ""
    for job in (o for o in objects if o.get("kind") == "RayJob"):
        pods = point_pods(job)
        if placeable(pods, nodes) is False:
            biggest = max(nodes, key=lambda n: (n.get("cpu", 0.0), n.get("memory", 0.0)))
            roles = ", ".join(f"{p.role} ({_fmt(p.requests)})" for p in pods)
            return (f"point {job['metadata']['name']} can never be scheduled: its pods {roles} do not fit the "
                    f"{len(nodes)} node(s) together (largest allocatable: {_fmt(biggest)}); lower head/worker "
                    "resources or worker.replicas (for a kind cluster: -f deploy/values-kind.yaml)")
    return ""
