"""What the KubeRay operator v1.7.0 does to a RayJob, written down from its source, for the contract tests.

No Kubernetes API server or operator runs on our machines, so the tests carry the operator's defaulting:
given a rendered RayJob, ``defaulted(job)`` returns the objects the operator would create from it (the
RayCluster's head and worker Pods, the two head Services, the submitter Job, the auth Secret's name), each
field as the source below sets it. Source: github.com/ray-project/kuberay, tag v1.7.0 (commit
59d663aeec13760646da3db9c1cf8cfe883e30b7), files under ray-operator/controllers/ray/:

- ``utils/constant.go``: port names/numbers (client 10001, gcs-server 6379, dashboard 8265, metrics 8080,
  serve 8000), dashboard-agent-listen-port 52365, env var names, probe timings, ``ray-job-submitter``.
- ``common/pod.go``: ``DefaultHeadPodTemplate``/``DefaultWorkerPodTemplate`` (labels from ``labelPod``;
  ``metrics: 8080`` appended to the Ray container when no port is named ``metrics``; the ``wait-gcs-ready``
  init container on workers, copying the Ray container's securityContext, env and volumeMounts, 200m/256Mi;
  token auth env via ``configureTokenAuth``), ``BuildPod`` (``/dev/shm`` emptyDir unless mounted, the
  ``ulimit; ray start`` command, ``setInitContainerEnvVars``, ``setContainerEnvVars``,
  ``initLivenessAndReadinessProbe``: HTTP /api/healthz on 52365 for Ray >= 2.53), ``setMissingRayStartParams``.
- ``common/service.go``: ``BuildServiceForHeadPod`` (ports = the head container's ports by name, plus
  ``metrics: 8080`` when no port is named ``metrics``; headless; selector ``HeadServiceLabels``).
- ``common/job.go``: ``BuildHeadServiceForRayJob`` (a second head Service ``{rayjob}-head-svc`` whose selector
  keeps ``app.kubernetes.io/name: kuberay``), ``GetSubmitterTemplate``, ``BuildJobSubmitCommand``.
- ``rayjob_controller.go``: ``initRayJobStatusIfNeed`` (cluster ``{rayjob}-{5 chars}``),
  ``constructRayClusterForRayJob``, ``getSubmitterTemplate``/``configureSubmitterContainer``,
  ``createNewK8sJob`` (Job named like the RayJob, backoffLimit from submitterConfig or 2).
- ``raycluster_controller.go``: the head Service ``{cluster}-head-svc`` takes ``app.kubernetes.io/name`` from
  the head template; pod names via ``utils.PodName`` (``{cluster}-head-``, ``{cluster}-{group}-worker-``),
  the token Secret ``CheckName(cluster)`` (key ``auth_token``).
Only the paths mzsane's chart takes are written down (no autoscaler, GCS FT, TLS, history server, serve).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CRDS_ENV = "MZSANE_KUBERAY_CRDS"

VERSION = "v1.7.0"

# utils/constant.go
DEFAULT_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080, "serve": 8000}
DASHBOARD_AGENT_LISTEN_PORT = 52365
CLUSTER_DOMAIN = "cluster.local"
RANDOM_SUFFIX = "x7k2q"  # utils.GenerateRayClusterName / GenerateRayJobId: name + "-" + rand.String(5)
BASH = ["/bin/bash", "-c", "--"]  # utils.GetContainerCommand([]) without ENABLE_LOGIN_SHELL
BASH_E = ["/bin/bash", "-ce", "--"]  # utils.GetContainerCommand(["e"]) (the submitter)
MAX_RAYJOB_NAME = 47  # utils.MaxRayJobNameLength = MaxRayClusterNameLength (53) - 6
MAX_RAYCLUSTER_NAME = 53


def crd_file(name: str) -> Path:
    """A KubeRay v1.7.0 CRD file: from $MZSANE_KUBERAY_CRDS (e.g. the crds/ folder of the kuberay-operator
    chart 1.7.0) or ../shared/kuberay/; missing, the test skips, and fails under CI=true."""
    from tests.conftest import requires

    folder = Path(os.environ.get(CRDS_ENV) or ROOT.parent / "shared" / "kuberay")
    path = folder / name
    requires(f"KubeRay {VERSION} CRD {path}", path.is_file(),
             f"set {CRDS_ENV} to the crds/ folder of the kuberay-operator chart {VERSION.lstrip('v')}")
    return path


def _env(container: dict[str, Any]) -> list[dict[str, Any]]:
    return container.setdefault("env", [])


def _has_env(container: dict[str, Any], name: str) -> bool:
    return any(e["name"] == name for e in container.get("env", []))


def check_name(name: str) -> str:
    """utils.CheckName: keep the last 50 characters; a leading digit or punctuation becomes 'r'."""
    if len(name) > 50:
        name = name[len(name) - 50:]
    if name[0].isdigit() or not name[0].isalnum():
        name = "r" + name[1:]
    return name


def check_label(value: str) -> str:
    """utils.CheckLabel: keep the last 63 characters."""
    return value[len(value) - 63:] if len(value) > 63 else value


def pod_name(prefix: str, node_type: str) -> str:
    """utils.PodName(prefix, nodeType, isGenerateName=true)."""
    return f"{prefix[:50]}-{node_type}-".lower()


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    try:
        return tuple(int(x) for x in version.split(".")[:3]) >= minimum
    except ValueError:
        return False


def auth_enabled(cluster_spec: dict[str, Any]) -> bool:
    return (cluster_spec.get("authOptions") or {}).get("mode") == "token"


def _token_env(cluster: str, container: dict[str, Any], cluster_spec: dict[str, Any]) -> None:
    """common/pod.go SetContainerTokenAuthEnvVars (token mode, no K8s token auth)."""
    if not _has_env(container, "RAY_AUTH_MODE"):
        _env(container).append({"name": "RAY_AUTH_MODE", "value": "token"})
    secret = (cluster_spec.get("authOptions") or {}).get("secretName") or check_name(cluster)
    if not _has_env(container, "RAY_AUTH_TOKEN"):
        _env(container).append({"name": "RAY_AUTH_TOKEN",
                                "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}})


def _labels(node_type: str, cluster: str, group: str, template_labels: dict[str, str]) -> dict[str, str]:
    """common/pod.go labelPod: template labels override all but ray.io/node-type, ray.io/group, ray.io/cluster."""
    labels = {"ray.io/is-ray-node": "yes", "ray.io/cluster": cluster, "ray.io/node-type": node_type,
              "ray.io/group": group, "ray.io/identifier": check_label(f"{cluster}-{node_type}"),
              "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
    for key, value in (template_labels or {}).items():
        if key not in ("ray.io/node-type", "ray.io/group", "ray.io/cluster"):
            labels[key] = value
    return labels


def _start_params(params: dict[str, str], node_type: str, fqdn: str) -> dict[str, str]:
    """common/pod.go setMissingRayStartParams."""
    params = dict(params or {})
    if node_type == "worker":
        params.setdefault("address", f"{fqdn}:6379")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", str(DASHBOARD_AGENT_LISTEN_PORT))
    return params


def _start_command(node_type: str, params: dict[str, str]) -> str:
    """common/pod.go generateRayStartCommand + convertParamMap (sorted flags, 'true' = bare switch)."""
    flags = "".join(f" --{k} " if str(v).lower() == "true" else f" --{k}={v} "
                    for k, v in sorted(params.items()) if str(v).lower() != "false")
    return f"ray start {'--head ' if node_type == 'head' else ''}{flags}"


def _add_metrics_port(container: dict[str, Any]) -> None:
    """common/pod.go: 'If the metrics port does not exist in the Ray container, add a default one'."""
    if not any(p.get("name") == "metrics" for p in container.get("ports", [])):
        container.setdefault("ports", []).append({"name": "metrics", "containerPort": 8080})


def _probes(container: dict[str, Any], node_type: str, ray_version: str) -> None:
    """common/pod.go initLivenessAndReadinessProbe (HTTP health check for Ray >= 2.53)."""
    action = ({"httpGet": {"path": "/api/healthz", "port": DASHBOARD_AGENT_LISTEN_PORT}}
              if _version_at_least(ray_version, (2, 53)) else
              {"exec": {"command": ["bash", "-c", "wget -q -O- http://localhost:52365/api/local_raylet_healthz"]}})
    head = node_type == "head"
    container.setdefault("livenessProbe", {"initialDelaySeconds": 30, "timeoutSeconds": 5 if head else 2,
                                           "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 120,
                                           **action})
    container.setdefault("readinessProbe", {"initialDelaySeconds": 10, "timeoutSeconds": 5 if head else 2,
                                            "periodSeconds": 5, "successThreshold": 1, "failureThreshold": 10,
                                            **action})


def _build_pod(template: dict[str, Any], node_type: str, group: str, cluster: str, namespace: str,
               params: dict[str, str], cluster_spec: dict[str, Any]) -> dict[str, Any]:
    fqdn = f"{cluster}-head-svc.{namespace}.svc.{CLUSTER_DOMAIN}"
    tpl = copy.deepcopy(template)
    spec = tpl["spec"]
    ray = spec["containers"][0]  # utils.RayContainerIndex = 0
    if node_type == "worker":  # DefaultWorkerPodTemplate: the init container copies the template as written
        spec.setdefault("initContainers", []).append({
            "name": "wait-gcs-ready", "image": ray["image"], "imagePullPolicy": ray.get("imagePullPolicy"),
            "command": list(BASH),
            "args": [f"until ray health-check --address {fqdn}:6379 > /dev/null 2>&1; do sleep 5; done"],
            "securityContext": copy.deepcopy(ray.get("securityContext")),
            "env": copy.deepcopy(ray.get("env", [])), "volumeMounts": copy.deepcopy(ray.get("volumeMounts", [])),
            "resources": {"limits": {"cpu": "200m", "memory": "256Mi"},
                          "requests": {"cpu": "200m", "memory": "256Mi"}}})
    metadata = tpl.setdefault("metadata", {})
    metadata["namespace"] = namespace
    metadata["generateName"] = pod_name(cluster if node_type == "head" else f"{cluster}-{group}", node_type)
    metadata["labels"] = _labels(node_type, cluster, group, metadata.get("labels", {}))
    params = _start_params(params, node_type, fqdn)
    _add_metrics_port(ray)
    if auth_enabled(cluster_spec):  # configureTokenAuth: Ray container and wait-gcs-ready
        _token_env(cluster, ray, cluster_spec)
        for init in spec.get("initContainers", []):
            if init["name"] == "wait-gcs-ready":
                _token_env(cluster, init, cluster_spec)
    # BuildPod
    if "plasma-directory" not in params and not any(m["mountPath"] == "/dev/shm" for m in ray.get("volumeMounts", [])):
        if not any(v["name"] == "shared-mem" for v in spec.get("volumes", [])):
            limit = ray.get("resources", {}).get("limits", {}).get("memory")
            spec.setdefault("volumes", []).append({"name": "shared-mem", "emptyDir": {
                "medium": "Memory", **({"sizeLimit": limit} if limit else {})}})
        ray.setdefault("volumeMounts", []).append({"name": "shared-mem", "mountPath": "/dev/shm"})
    start = _start_command(node_type, params)
    user_cmd = " ".join(ray.get("command", []) + ray.get("args", []))
    if "ray start" not in user_cmd:
        generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"
        ray["command"] = list(BASH)
        ray["args"] = [f"{user_cmd} && {generated}" if user_cmd else generated]
    for init in spec.get("initContainers", []):  # setInitContainerEnvVars
        _env(init).extend([{"name": "FQ_RAY_IP", "value": fqdn}, {"name": "RAY_IP", "value": f"{cluster}-head-svc"}])
    env = _env(ray)  # setContainerEnvVars
    address = "127.0.0.1" if node_type == "head" else fqdn
    if node_type == "worker":
        env.extend([{"name": "FQ_RAY_IP", "value": fqdn}, {"name": "RAY_IP", "value": f"{cluster}-head-svc"}])
    env.extend([
        {"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
        {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "RAY_CLOUD_INSTANCE_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "RAY_NODE_TYPE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/group']"}}},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": start}])
    for name, value in (("RAY_PORT", "6379"), ("RAY_ADDRESS", f"{address}:6379"),
                        ("RAY_USAGE_STATS_KUBERAY_IN_USE", "1")):
        if not _has_env(ray, name):
            env.append({"name": name, "value": value})
    if node_type == "head":
        env.append({"name": "RAY_USAGE_STATS_EXTRA_TAGS", "value": f"kuberay_version={VERSION};kuberay_crd=RayJob"})
    if not _has_env(ray, "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE"):
        env.append({"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"})
    _probes(ray, node_type, cluster_spec.get("rayVersion", ""))
    metadata["name"] = metadata["generateName"] + RANDOM_SUFFIX  # what the API server makes of generateName
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def head_service(cluster: str, namespace: str, cluster_spec: dict[str, Any], *, for_rayjob: str = "") -> dict[str, Any]:
    """common/service.go BuildServiceForHeadPod; with for_rayjob, common/job.go BuildHeadServiceForRayJob."""
    head_tpl = cluster_spec["headGroupSpec"]["template"]
    ports: dict[str, int] = {}  # getPortsFromCluster: a Go map keyed by port name
    for port in head_tpl["spec"]["containers"][0].get("ports", []):
        ports[port.get("name") or f"{port['containerPort']}-port"] = port["containerPort"]
    if not ports:
        ports = dict(DEFAULT_PORTS)
    ports.setdefault("metrics", 8080)  # "check if metrics port is defined. If not, add default value for it."
    selector = {"ray.io/cluster": cluster, "ray.io/node-type": "head",
                "ray.io/identifier": check_label(f"{cluster}-head"), "app.kubernetes.io/name": "kuberay",
                "app.kubernetes.io/created-by": "kuberay-operator"}
    if not for_rayjob:  # raycluster_controller.go passes the head template's app.kubernetes.io/name
        name_label = (head_tpl.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/name")
        if name_label:
            selector["app.kubernetes.io/name"] = name_label
    name = f"{for_rayjob or cluster}-head-svc"
    labels = (dict(selector) if not for_rayjob else
              {"ray.io/originated-from-cr-name": for_rayjob, "ray.io/originated-from-crd": "RayJob",
               "ray.io/node-type": "head", "ray.io/identifier": check_label(f"{for_rayjob}-head")})
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"selector": selector, "clusterIP": "None", "publishNotReadyAddresses": True,
                     "ports": [{"name": n, "port": p, "appProtocol": "tcp"} for n, p in sorted(ports.items())]}}


def submitter_job(rayjob: dict[str, Any], cluster: str) -> dict[str, Any]:
    """rayjob_controller.go getSubmitterTemplate + configureSubmitterContainer + createNewK8sJob."""
    name, namespace, spec = rayjob["metadata"]["name"], rayjob["metadata"]["namespace"], rayjob["spec"]
    template = copy.deepcopy(spec.get("submitterPodTemplate") or {"spec": {"restartPolicy": "Never", "containers": [
        {"name": "ray-job-submitter", "image": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
         ["containers"][0]["image"], "resources": {"limits": {"cpu": "1", "memory": "1Gi"},
                                                  "requests": {"cpu": "500m", "memory": "200Mi"}}}]}})
    container = template["spec"]["containers"][0]
    dashboard = f"{cluster}-head-svc.{namespace}.svc.{CLUSTER_DOMAIN}:8265"  # status.dashboardURL
    job_id = f"{name}-{RANDOM_SUFFIX}"
    if not container.get("command"):
        flags = ""
        if spec.get("entrypointNumCpus"):
            flags += f" --entrypoint-num-cpus {float(spec['entrypointNumCpus']):f}"
        if spec.get("entrypointNumGpus"):
            flags += f" --entrypoint-num-gpus {float(spec['entrypointNumGpus']):f}"
        if spec.get("entrypointResources"):
            flags += f" --entrypoint-resources {json.dumps(spec['entrypointResources'])}"
        container["command"] = list(BASH_E)
        container["args"] = [f"if ! ray job status --address http://{dashboard} {job_id} >/dev/null 2>&1 ; then "
                             f"ray job submit --address http://{dashboard} --no-wait --submission-id {job_id}{flags}"
                             f" -- {spec['entrypoint'].strip()} ; fi ; ray job logs --address http://{dashboard} "
                             f"--follow {job_id}"]
    _env(container).extend([{"name": "PYTHONUNBUFFERED", "value": "1"},
                            {"name": "RAY_DASHBOARD_ADDRESS", "value": dashboard},
                            {"name": "RAY_JOB_SUBMISSION_ID", "value": job_id}])
    if auth_enabled(spec["rayClusterSpec"]):
        _token_env(cluster, container, spec["rayClusterSpec"])
    labels = template.setdefault("metadata", {}).setdefault("labels", {})
    labels.update({"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                   "app.kubernetes.io/created-by": "kuberay-operator"})
    backoff = (spec.get("submitterConfig") or {}).get("backoffLimit", 2)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": {
                "ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                "app.kubernetes.io/created-by": "kuberay-operator"}},
            "spec": {"backoffLimit": backoff, "template": template}}


def submitter_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The Job controller's pod: the template plus job-name labels (a label value: the Job name <= 63)."""
    template = copy.deepcopy(job["spec"]["template"])
    metadata = template.setdefault("metadata", {})
    metadata["labels"] = {**metadata.get("labels", {}), "batch.kubernetes.io/job-name": job["metadata"]["name"],
                          "job-name": job["metadata"]["name"]}
    metadata["name"] = f"{job['metadata']['name']}-{RANDOM_SUFFIX}"
    metadata["namespace"] = job["metadata"]["namespace"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def defaulted(rayjob: dict[str, Any]) -> dict[str, Any]:
    """Everything the operator creates for one RayJob (K8sJobMode, its own RayCluster)."""
    name, namespace = rayjob["metadata"]["name"], rayjob["metadata"]["namespace"]
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    cluster = f"{name}-{RANDOM_SUFFIX}"
    head_group = cluster_spec["headGroupSpec"]
    pods = [_build_pod(head_group["template"], "head", "headgroup", cluster, namespace,
                       head_group.get("rayStartParams", {}), cluster_spec)]
    for group in cluster_spec.get("workerGroupSpecs", []):
        pods.append(_build_pod(group["template"], "worker", group["groupName"], cluster, namespace,
                               group.get("rayStartParams", {}), cluster_spec))
    job = submitter_job(rayjob, cluster)
    return {"cluster": cluster, "pods": pods, "submitter": job, "submitter_pod": submitter_pod(job),
            "services": [head_service(cluster, namespace, cluster_spec),
                         head_service(cluster, namespace, cluster_spec, for_rayjob=name)],
            "auth_secret": check_name(cluster) if auth_enabled(cluster_spec) else None}


def validate(rayjob: dict[str, Any]) -> list[str]:
    """The operator's own checks that refuse a RayJob (utils/validation.go ValidateRayJobMetadata,
    ValidateRayJobSpec, ValidateRayClusterSpec), for the fields the chart sets."""
    errors = []
    name, spec = rayjob["metadata"]["name"], rayjob["spec"]
    if len(name) > MAX_RAYJOB_NAME:
        errors.append(f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters: {name}")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if key in spec and spec[key] <= 0:
            errors.append(f"{key} must be a positive integer")
    if spec.get("submissionMode") == "SidecarMode" and spec.get("submitterPodTemplate"):
        errors.append("SidecarMode doesn't support SubmitterPodTemplate")
    cluster_spec = spec["rayClusterSpec"]
    groups = [("Head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    for group_name, group in groups:  # validateRayGroupResources
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "memory", "num-gpus", "resources")) and group.get("resources"):
            errors.append(f"resource fields should not be set in both rayStartParams and Resources for {group_name}")
    if auth_enabled(cluster_spec) and not _version_at_least(cluster_spec.get("rayVersion", ""), (2, 52)):
        errors.append("authOptions.mode is 'token' but minimum Ray version is 2.52.0")
    if (cluster_spec.get("authOptions") or {}).get("enableK8sTokenAuth"):
        errors.append("K8s token auth mode is currently not supported for RayJob")
    return errors
