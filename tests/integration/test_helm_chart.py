"""The sweep chart rendered and linted by real Helm (helm-python-sdk bundles Helm's Go SDK).

Every RayJob is validated against KubeRay's own CRD schema (``../shared/kuberay/ray.io_rayjobs.yaml``,
v1 openAPIV3Schema) made strict on field names, and core objects against Kubernetes' OpenAPI schemas
with kubernetes-validate, so a misspelled field fails here rather than on a cluster.
"""
from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mzsane import sweep  # noqa: E402
from mzsane.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mzsane"
JOBS = sorted(glob.glob(str(ROOT / "jobs" / "*.yaml")))
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _strict(schema):
    """additionalProperties: false wherever properties are listed, so unknown field names fail."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=1)
def _rayjob_validator():
    if not CRD.exists():
        pytest.skip(f"KubeRay CRD not found at {CRD}")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _render(values: dict | None, release: str = "sweep1") -> list[dict]:
    out = helm_python.Chart.load(str(CHART)).render(values, name=release, namespace="mzsane")
    return [d for k, t in out.items() if k.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def _values(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _rayjobs(objs):
    return [o for o in objs if o["kind"] == "RayJob"]


def _check_rayjob(obj):
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayJob"
    errors = sorted(_rayjob_validator().iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def _pods(job):
    cluster = job["spec"]["rayClusterSpec"]
    yield cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]
    yield job["spec"]["submitterPodTemplate"]


def test_crd_validator_is_strict_on_field_names():
    objs = _render(_values(JOBS[0]))
    job = copy.deepcopy(_rayjobs(objs)[0])
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e.message for e in _rayjob_validator().iter_errors(job))


@pytest.mark.parametrize("path", JOBS, ids=[os.path.basename(p) for p in JOBS])
def test_every_jobs_file_renders_lints_and_validates(path):
    values = _values(path)
    objs = _render(values)
    jobs = _rayjobs(objs)
    assert jobs, f"{path} rendered no RayJob"
    for job in jobs:
        _check_rayjob(job)
        for pod in _pods(job):  # the pod templates also against Kubernetes' own PodTemplate schema
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": pod}, "1.33.0", strict=True)
    config_maps = [o for o in objs if o["kind"] == "ConfigMap"]
    assert len(config_maps) == len(jobs)
    for obj in objs:
        if obj["kind"] not in ("RayJob", "PodMonitor"):  # CRDs: no core schema to validate against
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
    lint = helm_python.lint(str(CHART), values, strict=True, namespace="mzsane", kube_version="1.33.0")
    assert lint["errors"] == []
    assert [m for m in lint["messages"] if m["severity"] > 1] == []


def test_grid_renders_sizes_times_compositions_with_resolved_overrides():
    values = _values(str(ROOT / "jobs" / "grid.yaml"))
    grid = values["sweep"]["grid"]
    objs = _render(values)
    jobs = _rayjobs(objs)
    assert len(jobs) == len(grid["zooSizes"]) * len(grid["compositions"])
    seen = set()
    for cm in (o for o in objs if o["kind"] == "ConfigMap"):
        overrides = yaml.safe_load(cm["data"]["overrides.yaml"])
        point = json.loads(cm["data"]["point.json"])
        assert overrides["data"]["num_models_per_zoo"] == point["zoo_size"]
        assert overrides["data"]["zoos"] == point["zoos"]
        assert overrides["storage"]["root"] == "s3://mzsane/data"
        assert overrides["cluster"]["num_workers"] == values["worker"]["replicas"]
        seen.add((point["zoo_size"], tuple(point["zoos"])))
    assert seen == {(s, tuple(c["zoos"])) for s in grid["zooSizes"] for c in grid["compositions"]}
    job = jobs[0]
    entry = job["spec"]["entrypoint"]
    point = job["metadata"]["labels"]["mzsane.io/point"]
    assert entry.index("mzsane train") < entry.index("mzsane sample") < entry.index("mzsane evaluate")
    assert f"s3://mzsane/data/sweeps/grid/{point}" in entry
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_config_axes_multiply_points_and_land_in_the_config():
    values = _values(str(ROOT / "jobs" / "norm-ablation.yaml"))
    objs = _render(values)
    modes = [yaml.safe_load(o["data"]["overrides.yaml"])["loss"]["norm_mode"] for o in objs if o["kind"] == "ConfigMap"]
    assert sorted(modes) == sorted(values["sweep"]["grid"]["axes"][0]["values"])
    from mzsane import config, presets

    # the resolved overrides load into a real Config (no unknown keys, valid values)
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = config.from_dict(yaml.safe_load(cm["data"]["overrides.yaml"]), base=presets.small())
    assert cfg.data.zoos == values["sweep"]["grid"]["compositions"][0]["zoos"]


def test_long_names_are_truncated_dns_safe_and_unique():
    name = "a-very-long-sweep-name-about-zoo-size-and-composition-study-x"
    values = _values(str(ROOT / "jobs" / "grid.yaml"))
    values["sweep"]["name"] = name
    values["sweep"]["grid"]["compositions"].append(
        {"zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s", "animal_mnist-cnn_s", "mnist-resnet_mini"]})
    objs = _render(values, release="a-release-name-that-is-rather-long-too")
    names = [o["metadata"]["name"] for o in objs if o["kind"] == "RayJob"]
    assert len(set(names)) == len(names) == 5 * 4
    for obj in objs:
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63 and DNS1123.match(meta["name"]), meta["name"]
        for value in meta["labels"].values():
            assert len(value) <= 63
    for job in _rayjobs(objs):
        assert len(job["metadata"]["name"]) <= 47 and DNS1035.match(job["metadata"]["name"])  # KubeRay's limit
        assert DNS1123.match(job["metadata"]["labels"]["mzsane.io/point"])
        _check_rayjob(job)


def test_pods_run_restricted_and_name_their_metrics_ports():
    for job in _rayjobs(_render(_values(str(ROOT / "jobs" / "grid.yaml")))):
        for pod in _pods(job):
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] > 0
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            mounts = set()
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
                mounts |= {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts
            assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "tmp")
            assert pod["metadata"]["labels"]["mzsane.io/sweep"] == "grid"
        workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        ports = {p["name"]: p["containerPort"] for p in workers["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 9500 and ports["metrics-1"] == 9501


def test_no_credentials_in_rendered_output():
    values = _values(str(ROOT / "jobs" / "smoke.yaml"))
    text = json.dumps(_render(values))
    assert "AWS_SECRET_ACCESS_KEY" in text  # the variable exists ...
    for obj in _rayjobs(_render(values)):
        for pod in _pods(obj):
            for env in pod["spec"]["containers"][0]["env"]:
                if env["name"].startswith("AWS_") and "KEY" in env["name"]:
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"]  # ... only as a Secret ref
    assert not re.search(r"(?i)(secret_?access_?key|password)\s*[:=]\s*[\"']?[A-Za-z0-9/+]{8,}", text)


def test_podmonitor_renders_when_enabled():
    values = _values(str(ROOT / "jobs" / "zoo-size.yaml"))
    values["metrics"] = {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}}
    monitors = [o for o in _render(values) if o["kind"] == "PodMonitor"]
    assert len(monitors) == 1
    ports = [e["port"] for e in monitors[0]["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics", "metrics-1"]


@pytest.mark.parametrize("values,needle", [
    ({"sweep": {"grid": {"zooSizes": [-50]}}}, "/sweep/grid/zooSizes/0"),
    ({"sweep": {"grid": {"compositions": [{"zoos": ["cifar11-cnn_s"]}]}}}, "cifar11-cnn_s"),
    ({"sweep": {"targetZoo": "mnist-vit"}}, "mnist-vit"),
    ({"worker": {"resources": {"cpu": "1 core"}}}, "1 core"),
    ({"head": {"resources": {"memory": "-8Gi"}}}, "-8Gi"),
    ({"sweep": {"name": "s" * 64}}, "/sweep/name"),
    ({"sweep": {"name": "Bad_Name"}}, "Bad_Name"),
    ({"storage": {"s3": {"credentialsSecret": None}}}, "credentialsSecret"),
    ({"storage": {"s3": {"credentialsSecret": {"name": ""}}}}, "/storage/s3/credentialsSecret/name"),
    ({"sweep": {"runs": [{"name": "n100-mnist", "zooSize": 5, "zoos": ["mnist-cnn_s"]}]}}, "n100-mnist"),
    ({"sweep": {"grid": {"zooSizes": [100], "compositions": []}}}, "sweep.grid.zooSizes"),
    ({"sweep": {"gird": {}}}, "gird"),
])
def test_bad_values_are_rejected_naming_the_value(values, needle):
    with pytest.raises(helm_python.HelmError) as err:
        _render(values)
    assert needle in str(err.value)


def test_sweep_render_goes_through_helm(tmp_path):
    objs = sweep.render([str(ROOT / "jobs" / "composition.yaml")], release="r1", namespace="ns1")
    assert [o["kind"] for o in objs] == ["ConfigMap"] * 3 + ["RayJob"] * 3
    assert {o["metadata"]["namespace"] for o in objs} == {"ns1"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {grid: {zooSizes: [-1]}}\n")
    with pytest.raises(ConfigError, match="zooSizes/0") as err:
        sweep.render([str(bad)])
    assert "\n" not in str(err.value)


def test_deploy_manifests_validate_and_dashboard_uses_exported_metrics():
    for path in sorted((ROOT / "deploy" / "object-store").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                kubernetes_validate.validate(obj, "1.33.0", strict=True)
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "mzsane-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"mzsane_\w+", e)}
    exported = (ROOT / "mzsane" / "metrics.py").read_text()
    assert used and all(f'"{name}"' in exported for name in used), used


def test_sweep_render_rejects_unknown_config_paths(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("sweep: {grid: {axes: [{path: loss.norm_mod, values: [token]}]}}\n")
    with pytest.raises(ConfigError, match=r"sweep point 'n100-mnist-token'.*loss\.norm_mod"):
        sweep.render([str(bad)])
