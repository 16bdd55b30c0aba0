"""Operator contract: what our chart asks of KubeRay 1.7.0, checked on what the operator's own reconcilers
(ray-operator v1.6.2) make of it (the Go harness in tests/operator; every sweep goes through it in
test_operator_reconcile.py).

These tests pin chart decisions: the checks catch a duplicate metrics port, one port per local rank, the
driver on a GPU head, Kueue's suspend and labels, token auth reaching every container, release names that
do not collide, NetworkPolicies that admit a point's own pods, the object store's ports, one image and one
KubeRay release everywhere.
"""
from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tests.fixtures import operator as kuberay
from tests.fixtures.operator import DNS1123_LABEL, admission_problems, reconcile_one

helm_python = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mzsane.sweep import render  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
K8S = "1.33.0"


def _rayjobs(files: list[str], release: str = "sweep1") -> list[dict]:
    return [o for o in render(files, release=release, namespace="mzsane") if o["kind"] == "RayJob"]


@pytest.fixture
def made(kuberay_harness, tmp_path):
    """What the operator makes of one rendered RayJob."""
    return lambda job: reconcile_one(kuberay_harness, job, tmp_path)


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


def test_contract_catches_a_duplicate_metrics_port(made, kuberay_harness, tmp_path):
    """The v1.5.0 review's failure 1: a head port on 8080 not named "metrics" makes KubeRay add its own
    metrics: 8080, so the head Service carries 8080/TCP twice and the API server rejects it (its own
    refusal ends the harness; our second look, service_problems, names it too)."""
    job = _rayjobs([str(ROOT / "jobs" / "smoke.yaml")])[0]
    assert admission_problems(made(job), _validate) == []
    broken = copy.deepcopy(job)
    for tpl in [broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]]:
        for port in tpl["spec"]["containers"][0]["ports"]:
            if port["containerPort"] == 8080:
                port["name"] = "ray-metrics"
    result = kuberay.run_harness(kuberay_harness, "reconcile", [broken], tmp_path / "broken")
    assert result["returncode"] != 0, result["log"][-2000:]
    refusal = result["log"].strip().splitlines()[-1]
    assert "FailedToCreateService" in refusal and "is invalid: spec.ports" in refusal, refusal
    assert "Duplicate value" in refusal and '"Port":8080' in refusal, refusal


def test_kuberay_port_names_and_one_port_per_local_rank(made):
    job = _rayjobs([str(ROOT / "jobs" / "grid.yaml")])[0]
    ours = made(job)
    head, worker = ours["pods"][0], ours["pods"][1]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert {k: head_ports[k] for k in ("client", "gcs-server", "dashboard", "metrics")} == {
        "client": 10001, "gcs-server": 6379, "dashboard": 8265, "metrics": 8080}
    worker_ports = {p["name"]: p["containerPort"] for p in worker["spec"]["containers"][0]["ports"]}
    assert worker_ports == {"metrics": 8080, "mzsane-r0": 9500}  # CPU: one rank per pod
    assert [c["name"] for c in worker["spec"]["initContainers"]] == ["wait-gcs-ready"]
    for svc in ours["services"]:
        svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert svc_ports["metrics"] == 8080 and sorted(svc_ports.values()).count(8080) == 1

    gpu = _render_values({"worker": {"replicas": 2, "resources": {"cpu": "8", "memory": "32Gi", "gpu": 4}},
                          "head": {"resources": {"cpu": "2", "memory": "8Gi", "gpu": 1}}})
    gpu_made = made(gpu)
    worker = gpu_made["pods"][1]
    ranks = {p["name"]: p["containerPort"] for p in worker["spec"]["containers"][0]["ports"] if p["name"] != "metrics"}
    assert ranks == {f"mzsane-r{r}": 9500 + r for r in range(4)}  # local ranks, not the world's 8
    assert admission_problems(gpu_made, _validate) == []


def _render_values(extra: dict, release: str = "sweep1", tmp: Path | None = None) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(extra, fh)
    try:
        return _rayjobs([str(ROOT / "jobs" / "smoke.yaml"), fh.name], release=release)[0]
    finally:
        os.unlink(fh.name)


def test_gpu_sweeps_run_the_driver_on_a_gpu_head_and_never_on_a_worker(made):
    job = _render_values({"worker": {"replicas": 2, "resources": {"cpu": "8", "memory": "32Gi", "gpu": 2}},
                          "head": {"resources": {"cpu": "4", "memory": "16Gi", "gpu": 1}}})
    spec = job["spec"]
    assert spec["entrypointNumGpus"] == 1
    assert yaml.safe_load(spec["entrypointResources"]) == {"mzsane_driver": 1}
    head_params = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert yaml.safe_load(head_params["resources"].strip("'")) == {"mzsane_driver": 1}
    assert "resources" not in spec["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]
    # the generated `ray start` keeps the JSON intact through bash (single quotes)
    head = made(job)["pods"][0]
    start = next(e["value"] for e in head["spec"]["containers"][0]["env"] if e["name"] == "KUBERAY_GEN_RAY_START_CMD")
    assert "--resources={\"mzsane_driver\": 1}" in " ".join(shlex.split(start))
    with pytest.raises(Exception, match=r"head\.resources\.gpu"):
        _render_values({"worker": {"replicas": 1, "resources": {"cpu": "4", "memory": "8Gi", "gpu": 1}}})


def test_kueue_queue_suspends_and_labels_and_deadlines_default(kuberay_harness, tmp_path):
    job = _render_values({"job": {"queueName": "mzsane"}, "pod": {"priorityClassName": "batch-low"}})
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "mzsane"
    assert job["spec"]["suspend"] is True
    # the cluster's PriorityClass: without it the API server's Priority admission refuses every pod, and
    # Kueue cannot give the Workload its priority
    priority = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "batch-low"},
                "value": 100}
    result = kuberay.run_harness(kuberay_harness, "reconcile", [priority, job], tmp_path, queues=kuberay.QUEUES)
    assert result["returncode"] == 0, result["log"][-3000:]
    ours = kuberay.made_for(result, job["metadata"]["name"])  # made once Kueue admitted it (queues.yaml's "mzsane")
    workload = kuberay.workload_of(result, job["metadata"]["name"])
    assert workload["spec"]["priority"] == 100 and workload["spec"]["priorityClassRef"]["name"] == "batch-low"
    for pod in ours["pods"] + [ours["submitter_pod"]]:
        assert pod["spec"]["priorityClassName"] == "batch-low" and pod["spec"]["priority"] == 100
    plain = _rayjobs([str(ROOT / "jobs" / "grid.yaml")])[0]
    assert "suspend" not in plain["spec"] and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]
    assert plain["spec"]["activeDeadlineSeconds"] > 0 and plain["spec"]["preRunningDeadlineSeconds"] > 0


def test_token_auth_reaches_every_ray_container_and_the_submitter(made):
    job = _rayjobs([str(ROOT / "jobs" / "grid.yaml")])[0]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    ours = made(job)
    assert ours["auth_secret"]
    containers = [c for p in ours["pods"] for c in p["spec"].get("initContainers", []) + p["spec"]["containers"]]
    containers.append(ours["submitter_pod"]["spec"]["containers"][0])
    assert len(containers) >= 4  # head, worker, wait-gcs-ready, submitter
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == ours["auth_secret"]


def test_two_releases_of_one_sweep_do_not_collide():
    files = [str(ROOT / "jobs" / "zoo-size.yaml")]
    a = {(o["kind"], o["metadata"]["name"]) for o in render(files, release="alpha", namespace="mzsane")}
    b = {(o["kind"], o["metadata"]["name"]) for o in render(files, release="beta", namespace="mzsane")}
    assert a and b and not (a & b)
    for _, name in a | b:
        assert len(name) <= 63 and DNS1123_LABEL.match(name)


def test_network_policy_admits_the_points_own_pods_prometheus_and_the_operator_only(made):
    objs = render([str(ROOT / "jobs" / "composition.yaml")], release="r1", namespace="mzsane")
    policies = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    jobs = [o for o in objs if o["kind"] == "RayJob"]
    assert len(policies) == len(jobs)

    def selects(selector: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    ours = {j["metadata"]["name"]: made(j) for j in jobs}
    for name, policy in policies.items():
        kubernetes_validate.validate(policy, K8S, strict=True)
        own = ours[name]["pods"] + [ours[name]["submitter_pod"]]
        others = [p for n, m in ours.items() if n != name for p in m["pods"]]
        assert all(selects(policy["spec"]["podSelector"], p["metadata"]["labels"]) for p in own[:-1])
        assert not any(selects(policy["spec"]["podSelector"], p["metadata"]["labels"]) for p in others)
        peer = policy["spec"]["ingress"][0]["from"][0]["podSelector"]
        assert all(selects(peer, p["metadata"]["labels"]) for p in own)
        assert not any(selects(peer, p["metadata"]["labels"]) for p in others)
        open_ports = {p["port"] for rule in policy["spec"]["ingress"][1:] for p in rule.get("ports", [])}
        scraped = {p["containerPort"] for pod in own[:-1] for p in pod["spec"]["containers"][0]["ports"]
                   if p["name"] in ("metrics", "as-metrics", "dash-metrics") or p["name"].startswith("mzsane-r")}
        assert scraped <= open_ports and 8265 in open_ports
        assert not ({6379, 10001} & open_ports)  # GCS and Ray client only from the point's own pods


def test_bucket_job_talks_only_to_ports_its_services_expose():
    """The v1.5.0 review's failure 3: `weed shell -master=host:9333` also dials gRPC on 9333 + 10000, which
    the Service did not expose, so the bucket Job never finished. Every host:port the Job's command names
    (and its SeaweedFS gRPC twin, port + 10000) must be a port of the Service of that name, mapped to a
    container port of the SeaweedFS pod."""
    docs = [d for p in sorted((ROOT / "deploy" / "object-store").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container_ports = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
                       for p in c.get("ports", [])}
    job = next(d for d in docs if d["kind"] == "Job")
    command = " ".join(part for c in job["spec"]["template"]["spec"]["containers"]
                       for part in c.get("command", []) + c.get("args", []))
    targets = re.findall(r"-(master|filer)=([a-z0-9-]+):([0-9]+)", command)
    targets += [(kind, host, port) for kind, host, port in re.findall(r"(https?)://([a-z0-9-]+):([0-9]+)", command)]
    assert targets, command
    for kind, host, port in targets:
        needed = {int(port)} | ({int(port) + 10000} if kind in ("master", "filer") else set())
        assert host in services, f"{host} is no Service of deploy/object-store"
        exposed = {}
        for sp in services[host]["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            exposed[sp["port"]] = container_ports.get(target, target)
        for number in needed:
            assert number in exposed, f"Service {host} does not expose {number} (needed by: {command.strip()})"
            assert exposed[number] == number, f"Service {host} maps {number} to container port {exposed[number]}"


def test_image_installs_through_the_setup_path_and_matches_the_charts_ray():
    """The v1.5.0 review's failure 2 (an image without the datasets): the Dockerfile must install through
    the same script as `make setup`, so the tested environment is the shipped one; and the chart's
    rayVersion must be the image's Ray."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    runs = " ".join(line for line in dockerfile.splitlines() if line.lstrip().startswith("RUN")
                    or line.startswith(" "))
    assert re.search(r"install\.sh\s+system", runs) and re.search(r"install\.sh\s+python", runs), \
        "deploy/Dockerfile must run the shared install script (system and python parts)"
    assert "scripts/install.sh" in makefile
    assert "pip install" not in runs.replace("install.sh", ""), "the image must not pip-install on its own"
    ray_image = re.search(r"ARG RAY_IMAGE=rayproject/ray:([0-9.]+)", dockerfile).group(1)
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    values = yaml.safe_load((ROOT / "helm" / "mzsane" / "values.yaml").read_text())
    assert ray_image == pin == values["job"]["rayVersion"]


def test_one_kuberay_release_everywhere():
    values = yaml.safe_load((ROOT / "deploy" / "kuberay-operator-values.yaml").read_text())
    assert values["image"]["tag"] == kuberay.VERSION
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert set(re.findall(r"kuberay-operator --version ([0-9.]+)", readme)) == {kuberay.VERSION.lstrip("v")}
    assert kuberay.VERSION.lstrip("v") in (ROOT / "helm" / "mzsane" / "Chart.yaml").read_text()
    crd = yaml.safe_load(kuberay.crd_file("ray.io_rayjobs.yaml").read_text())
    assert "entrypointResources" in crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]  # the 1.7.0 fields the chart uses exist in the CRDs the tests read


def test_missing_crds_skip_locally_and_fail_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv(kuberay.CRDS_ENV, str(tmp_path))
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match=kuberay.CRDS_ENV):
        kuberay.crd_file("ray.io_rayjobs.yaml")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        kuberay.crd_file("ray.io_rayjobs.yaml")
    (tmp_path / "ray.io_rayjobs.yaml").write_text("kind: CustomResourceDefinition\n")
    assert kuberay.crd_file("ray.io_rayjobs.yaml") == tmp_path / "ray.io_rayjobs.yaml"


def _quantity(text: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if str(text).endswith(suffix):
            return float(str(text)[: -len(suffix)]) * factor
    return float(text)


def test_kueue_example_quota_admits_four_grid_points_at_a_time(made):
    """deploy/README.md's claim: the example ClusterQueue runs 4 of jobs/grid.yaml's points at once."""
    job = _rayjobs([str(ROOT / "jobs" / "grid.yaml")])[0]
    ours = made(job)
    pods = [(pod, 1) for pod in ours["pods"] + [ours["submitter_pod"]]]
    need = {"cpu": 0.0, "memory": 0.0}
    for pod, count in pods:  # Kueue counts max(any init container, sum of containers) per pod
        for res in need:
            main = sum(_quantity(c["resources"]["requests"][res]) for c in pod["spec"]["containers"])
            init = max([_quantity(c["resources"]["requests"][res]) for c in pod["spec"].get("initContainers", [])],
                       default=0.0)
            need[res] += count * max(main, init)
    queue = next(d for d in yaml.safe_load_all((ROOT / "deploy" / "kueue" / "queues.yaml").read_text())
                 if d["kind"] == "ClusterQueue")
    quota = {r["name"]: _quantity(r["nominalQuota"])
             for r in queue["spec"]["resourceGroups"][0]["flavors"][0]["resources"]}
    fits = min(int(quota[res] // need[res]) for res in need)
    assert fits == 4, (need, quota)


@pytest.mark.parametrize("container", ["head", "submitter"])
def test_the_api_server_enforces_restricted_pod_security(kuberay_harness, tmp_path, container):
    """Pod Security admission is live on the real API server: a pod whose container may run as root and
    keeps its capabilities is refused with PodSecurity's own message, whether the RayCluster reconciler
    made it (head) or the Job controller's part made it from the submitter Job (submitter). The unbroken
    point passes in every other test of this module."""
    job = copy.deepcopy(_rayjobs([str(ROOT / "jobs" / "smoke.yaml")])[0])
    spec = job["spec"]
    template = (spec["rayClusterSpec"]["headGroupSpec"]["template"] if container == "head"
                else spec["submitterPodTemplate"])
    for scope in [template["spec"], *template["spec"]["containers"]]:
        scope.get("securityContext", {}).pop("runAsNonRoot", None)
        scope.get("securityContext", {}).pop("capabilities", None)
    result = kuberay.run_harness(kuberay_harness, "reconcile", [job], tmp_path)
    assert result["returncode"] != 0, result["log"][-2000:]
    refusal = result["log"].strip().splitlines()[-1]
    assert 'violates PodSecurity "restricted:latest"' in refusal, result["log"][-2000:]
    assert "runAsNonRoot != true" in refusal and 'must set securityContext.capabilities.drop=["ALL"]' in refusal
    assert ("FailedToCreateHeadPod" if container == "head" else "pod of Job") in refusal
