"""``mzsane sweep submit``/``status`` with the official Kubernetes client against kmock on 127.0.0.1.

Why kmock and not a real API server: no Kubernetes API server can run on these machines (no
kube-apiserver, kind, k3s or minikube binaries, no container runtime; see infra-notes §6). kmock's
``KubernetesEmulator`` is a stateful in-memory Kubernetes API over real HTTP, so the client's requests,
paths, label selectors, status subresource and error codes are exercised for real. It neither validates
schemas nor runs controllers: the RayJob schema is checked in test_helm_chart.py, and the operator's
status updates are played here through the status subresource, as KubeRay would write them.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

kmock = pytest.importorskip("kmock")
pytest.importorskip("helm_python")
from kubernetes import client  # noqa: E402

from mzsane import sweep  # noqa: E402
from mzsane.errors import ClusterError  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS = "mzsane"


@pytest.fixture(scope="module")
def kube_api():
    """kmock's emulator on a loopback port, served from its own event loop in a background thread."""
    ready, box = threading.Event(), {}

    async def serve():
        emulator = kmock.KubernetesEmulator()
        emulator.resources["ray.io/v1/rayjobs"] = {}
        emulator.resources["v1/configmaps"] = {}
        emulator.resources["v1/nodes"] = {}
        emulator["get /apis/ray.io/v1/namespaces/locked/rayjobs"] << 403 << {
            "kind": "Status", "message": 'rayjobs.ray.io is forbidden: User "bob" cannot list resource "rayjobs"'}
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            box.update(url=str(server.url).rstrip("/"), loop=asyncio.get_running_loop(), stop=asyncio.Event())
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(20), "kmock did not start"
    yield box["url"]
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


@pytest.fixture
def kubeconfig(kube_api, tmp_path, monkeypatch):
    """A real kubeconfig file pointing at kmock, so sweep.py loads its config as it would for a user."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": kube_api}}],
        "users": [{"name": "dev", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "dev", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def _labels(node):
    """Every (key, value) of every ``labels`` map in an object, pod templates included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "labels" and isinstance(value, dict):
                yield from value.items()
            else:
                yield from _labels(value)
    elif isinstance(node, list):
        for value in node:
            yield from _labels(value)


def _raw_api(url):
    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


def test_submit_creates_configmaps_and_rayjobs_then_status_reports_them(kubeconfig, kube_api):
    job_file = ROOT / "jobs" / "composition.yaml"
    n = len(yaml.safe_load(job_file.read_text())["sweep"]["grid"]["compositions"])  # one point per composition
    objs = sweep.render([str(job_file)], release="composition", namespace=NS)
    created = sweep.submit(objs, NS)
    assert sorted(r["kind"] for r in created) == ["ConfigMap"] * n + ["NetworkPolicy"] * n + ["RayJob"] * n
    assert [r["action"] for r in created] == ["created"] * 3 * n  # not the `helm test` Pod: install never creates it
    assert any(o["kind"] == "Pod" for o in objs)
    assert [r["action"] for r in sweep.submit(objs, NS)] == ["exists"] * 3 * n  # re-submitting is safe

    raw = _raw_api(kube_api)
    core, custom = client.CoreV1Api(raw), client.CustomObjectsApi(raw)
    jobs = [o for o in objs if o["kind"] == "RayJob"]
    stored = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", jobs[0]["metadata"]["name"])
    assert stored["spec"]["entrypoint"] == jobs[0]["spec"]["entrypoint"]
    cm = core.read_namespaced_config_map(jobs[0]["metadata"]["name"], NS)
    assert yaml.safe_load(cm.data["overrides.yaml"])["data"]["num_models_per_zoo"] == 100
    # Helm does not own what `sweep submit` creates: no object, pod template included, claims it does
    assert jobs[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # as rendered
    for obj in (stored, cm.to_dict()):
        labels = [v for k, v in _labels(obj) if k == "app.kubernetes.io/managed-by"]
        assert labels and set(labels) == {"mzsane"}, labels

    # a RayJob of another sweep must not show up
    other = dict(jobs[0], metadata={"name": "other-job", "labels": {"mzsane.io/sweep": "other"}})
    custom.create_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", other)

    # play the KubeRay operator: one point finished, one running, one not started
    custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", jobs[0]["metadata"]["name"], {
        "status": {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete",
                   "startTime": "2026-01-01T10:00:00Z", "endTime": "2026-01-01T10:30:00Z"}})
    custom.patch_namespaced_custom_object_status("ray.io", "v1", NS, "rayjobs", jobs[1]["metadata"]["name"], {
        "status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "startTime": "2026-01-01T10:00:00Z"}})
    now = datetime(2026, 1, 1, 10, 10, tzinfo=UTC)
    rows = {r["job"]: r for r in sweep.status("composition", NS, now=now)}
    assert set(rows) == {j["metadata"]["name"] for j in jobs}
    assert n >= 3, "the test plays three points: finished, running, not started"
    done, running, new = (rows[j["metadata"]["name"]] for j in jobs[:3])
    assert all(rows[j["metadata"]["name"]]["job_status"] == "PENDING" for j in jobs[3:])
    assert (done["job_status"], done["deployment"], done["duration_s"]) == ("SUCCEEDED", "Complete", 1800.0)
    assert (running["job_status"], running["duration_s"]) == ("RUNNING", 600.0)
    assert (new["job_status"], new["duration_s"]) == ("PENDING", None)
    assert done["point"] == jobs[0]["metadata"]["labels"]["mzsane.io/point"]


def test_status_cli_prints_a_table(kubeconfig, capsys):
    sweep.submit(sweep.render([str(ROOT / "jobs" / "smoke.yaml")], namespace=NS), NS)
    sweep.status_cli(type("Args", (), {"sweep": "smoke", "namespace": NS})())
    out = capsys.readouterr().out
    assert "smoke" in out and "PENDING" in out and "1 points: 1 pending" in out
    with pytest.raises(ClusterError, match=r"no RayJobs labelled mzsane\.io/sweep=nothing"):
        sweep.status_cli(type("Args", (), {"sweep": "nothing", "namespace": NS})())


def test_forbidden_is_one_line_cluster_error(kubeconfig):
    with pytest.raises(ClusterError) as err:
        sweep.status("composition", "locked")
    message = str(err.value)
    assert "403" in message and "locked" in message and "RBAC" in message and "\n" not in message


def test_unreachable_api_is_one_line_cluster_error(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClusterError, match="unreachable") as err:
        sweep.status("composition", NS, api_client=_raw_api(f"http://127.0.0.1:{port}"))
    assert "\n" not in str(err.value)


def test_missing_kubeconfig_is_a_cluster_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterError, match="KUBECONFIG"):
        sweep.status("composition", NS)


def test_submit_refuses_a_sweep_whose_point_fits_no_node_and_creates_nothing(kubeconfig, kube_api):
    """One kind node of 8 CPU / 32 GiB: a grid point (10.5 CPU) can never run there; with the kind overlay it can."""
    raw = _raw_api(kube_api)
    core = client.CoreV1Api(raw)
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kind-control-plane"},
                      "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "100Gi",
                                                 "pods": "110"}}})
    try:
        grid = sweep.render([str(ROOT / "jobs" / "grid.yaml")], release="fit", namespace=NS)
        with pytest.raises(ClusterError, match=r"^point fit-grid-\S+ can never be scheduled: .*deploy/values-kind"):
            sweep.submit(grid, NS)
        names = {o["metadata"]["name"] for o in grid if o["kind"] == "ConfigMap"}
        assert not names & {cm.metadata.name for cm in core.list_namespaced_config_map(NS).items}
        kind = sweep.render([str(ROOT / "jobs" / "grid.yaml"), str(ROOT / "deploy" / "values-kind.yaml")],
                            release="fit", namespace=NS)
        assert {r["action"] for r in sweep.submit(kind, NS)} == {"created"}
    finally:
        core.delete_node("kind-control-plane")
