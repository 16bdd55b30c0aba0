"""Sweeps on a Kubernetes cluster: create the rendered objects and watch the sweep's RayJobs.

Why here: this is the only module of ``mzsane.sweep`` importing the ``kubernetes`` client (lazily, so
``sweep run``, ``report`` and the RayJob's ``record-point`` step never load it). Objects created here
are labelled ``app.kubernetes.io/managed-by: mzsane``: Helm does not own them (``helm uninstall``
would not find them), and a Helm label would make ``helm install`` of the same release adopt-fail.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from datetime import datetime
from typing import Any

from mzsane.errors import ClusterError
from mzsane.sweep.capacity import quantity, unschedulable
from mzsane.sweep.chart import is_test_hook, render
from mzsane.sweep.results import format_table

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
SWEEP_LABEL, POINT_LABEL = "mzsane.io/sweep", "mzsane.io/point"
MANAGED_BY, MANAGER = "app.kubernetes.io/managed-by", "mzsane"
# kinds the chart renders besides ConfigMaps, created through the API group's REST path
PLURALS = {"RayJob": PLURAL, "PodMonitor": "podmonitors", "NetworkPolicy": "networkpolicies"}


def _api_client(api_client: Any = None) -> Any:
    """An ApiClient from kubeconfig (``KUBECONFIG``/~/.kube/config) or the in-cluster service account."""
    if api_client is not None:
        return api_client
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        # KUBECONFIG is read here, not at import time (the client's default is frozen when it is imported)
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    except Exception:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except Exception:
            raise ClusterError("no Kubernetes config found; set KUBECONFIG to a kubeconfig file or run inside "
                               "a pod with a service account") from None
    cfg.retries = 0  # fail fast: one line, not a minute of urllib3 retries
    return client.ApiClient(cfg)


def _cluster_error(err: Exception, action: str, namespace: str, host: str) -> ClusterError:
    """One line for any Kubernetes client failure: unreachable API, 403, missing CRD, bad object."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(err, ApiException):
        try:
            reason = str(json.loads(err.body or "{}").get("message", ""))
        except (TypeError, ValueError, AttributeError):
            reason = str(err.body or "")[:200]
        if err.status == 403:
            return ClusterError(f"Kubernetes API at {host} refused to {action} in namespace '{namespace}' "
                                f"(403 Forbidden: {reason}); grant your user RBAC on rayjobs.ray.io and configmaps")
        if err.status == 404:
            return ClusterError(f"cannot {action} in namespace '{namespace}' (404: {reason or err.reason}); create the "
                                f"namespace and install the CRD's operator "
                                f"(KubeRay: deploy/kuberay-operator-values.yaml)")
        return ClusterError(f"Kubernetes API at {host} could not {action} ({err.status} {err.reason}: {reason})")
    return ClusterError(f"Kubernetes API at {host} is unreachable while trying to {action} "
                        f"({type(err).__name__}); check KUBECONFIG and that the cluster is up")


def _call(api_client: Any, action: str, namespace: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, _request_timeout=30, **kwargs)
    except Exception as err:
        raise _cluster_error(err, action, namespace, api_client.configuration.host) from None


def node_allocatable(api_client: Any = None) -> list[dict[str, float]] | None:
    """Each node's allocatable resources (cpu cores, bytes, devices), or None where the user may not list
    nodes (namespace-scoped RBAC): the fit check is then skipped, not the submission."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = _api_client(api_client)
    try:
        nodes = client.CoreV1Api(api).list_node(_request_timeout=30).items
    except ApiException as err:
        if err.status in (401, 403, 404):
            return None
        raise _cluster_error(err, "list nodes", "", api.configuration.host) from None
    except Exception as err:
        raise _cluster_error(err, "list nodes", "", api.configuration.host) from None
    out = []
    for node in nodes:
        if node.spec and node.spec.unschedulable:
            continue
        out.append({k: quantity(v) for k, v in ((node.status.allocatable if node.status else None) or {}).items()})
    return out


def submit(objects: list[dict[str, Any]], namespace: str = "mzsane", api_client: Any = None,
           check_fit: bool = True) -> list[dict[str, str]]:
    """Create the rendered objects; existing ones are left alone (re-submitting a sweep is safe). A point
    whose pods no set of the cluster's nodes can hold at once is refused before anything is created."""
    from kubernetes import client

    api = _api_client(api_client)
    if check_fit:
        nodes = node_allocatable(api)
        problem = unschedulable(objects, nodes or [])
        if problem:
            raise ClusterError(problem)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    created: list[dict[str, str]] = []
    for obj in map(_owned_by_mzsane, (o for o in objects if not is_test_hook(o))):
        kind, name = obj.get("kind", ""), obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace") or namespace
        if kind == "ConfigMap":
            exists = _exists(api, ns, f"read ConfigMap {name}", core.read_namespaced_config_map, name, ns)
            if not exists:
                _call(api, f"create ConfigMap {name}", ns, core.create_namespaced_config_map, ns, obj)
        else:
            group, version = obj["apiVersion"].split("/") if "/" in obj["apiVersion"] else ("", obj["apiVersion"])
            plural = PLURALS.get(kind)
            if plural is None or not group:
                raise ClusterError(f"the chart rendered a {kind} '{name}' that sweep submit does not know; "
                                   "use helm install")
            exists = _exists(api, ns, f"read {kind} {name}", custom.get_namespaced_custom_object,
                             group, version, ns, plural, name)
            if not exists:
                _call(api, f"create {kind} {name}", ns, custom.create_namespaced_custom_object,
                      group, version, ns, plural, obj)
        created.append({"kind": kind, "name": name, "action": "exists" if exists else "created"})
    return created


def _owned_by_mzsane(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy whose ``managed-by`` labels (object and pod templates) name mzsane, not Helm, which does not own it."""
    def relabel(node: Any) -> None:
        if isinstance(node, dict):
            labels = node.get("labels")
            if isinstance(labels, dict) and MANAGED_BY in labels:
                labels[MANAGED_BY] = MANAGER
            for value in node.values():
                relabel(value)
        elif isinstance(node, list):
            for value in node:
                relabel(value)

    out = copy.deepcopy(obj)
    relabel(out)
    return out


def _exists(api: Any, namespace: str, action: str, fn: Any, *args: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        fn(*args, _request_timeout=30)
        return True
    except ApiException as err:
        if err.status == 404:
            return False
        raise _cluster_error(err, action, namespace, api.configuration.host) from None
    except Exception as err:
        raise _cluster_error(err, action, namespace, api.configuration.host) from None


def submit_cli(args: argparse.Namespace) -> None:
    objects = render(args.values, args.release, args.namespace, sets=getattr(args, "sets", None) or [])
    for row in submit(objects, args.namespace):
        print(f"{row['kind']:<11} {row['name']:<48} {row['action']}")


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def status(sweep: str, namespace: str = "mzsane", api_client: Any = None,
           now: datetime | None = None) -> list[dict[str, Any]]:
    """One row per RayJob of the sweep: point, job status, deployment status, duration (s), message."""
    from kubernetes import client

    api = _api_client(api_client)
    custom = client.CustomObjectsApi(api)
    listing = _call(api, f"list RayJobs of sweep '{sweep}'", namespace, custom.list_namespaced_custom_object,
                    GROUP, VERSION, namespace, PLURAL, label_selector=f"{SWEEP_LABEL}={sweep}")
    now = now or datetime.now().astimezone()
    rows = []
    for item in listing.get("items", []):
        meta, st = item.get("metadata", {}), item.get("status") or {}
        if (meta.get("labels") or {}).get(SWEEP_LABEL) != sweep:  # belt and braces on the server's selector
            continue
        start, end = _parse_time(st.get("startTime", "")), _parse_time(st.get("endTime", ""))
        duration = ((end or now) - start).total_seconds() if start else None
        rows.append({
            "point": meta.get("labels", {}).get(POINT_LABEL, ""),
            "job": meta.get("name", ""),
            "job_status": st.get("jobStatus") or "PENDING",
            "deployment": st.get("jobDeploymentStatus") or "New",
            "duration_s": round(duration, 1) if duration is not None else None,
            "message": " ".join(str(st.get("message", "")).split())[:120],
        })
    return sorted(rows, key=lambda r: r["point"])


def status_cli(args: argparse.Namespace) -> None:
    rows = status(args.sweep, args.namespace)
    if not rows:
        raise ClusterError(f"no RayJobs labelled {SWEEP_LABEL}={args.sweep} in namespace '{args.namespace}'; "
                           "check the sweep name (sweep.name in the values file) and --namespace")
    print(format_table(rows, ["point", "job_status", "deployment", "duration_s", "job", "message"]))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["job_status"]] = counts.get(row["job_status"], 0) + 1
    print(f"{len(rows)} points: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
