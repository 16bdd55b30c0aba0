"""The sweep chart rendered and linted by real Helm (helm-python-sdk bundles Helm's Go SDK).

Every RayJob is validated against KubeRay's own CRD schema (v1.7.0 ``ray.io_rayjobs.yaml``, v1
openAPIV3Schema, from $MZSANE_KUBERAY_CRDS or ``../shared/kuberay/``) made strict on field names, and core
objects against Kubernetes' OpenAPI schemas with kubernetes-validate, so a misspelled field fails here
rather than on a cluster. What the operator then makes of each RayJob is test_operator_contract.py's.
"""
from __future__ import annotations

import copy
import functools
import glob
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

helm_python = pytest.importorskip("helm_python")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mzsane import sweep  # noqa: E402
from mzsane.errors import ConfigError  # noqa: E402
from mzsane.sweep import overlay  # noqa: E402
from tests.fixtures import operator as kuberay  # noqa: E402
from tests.fixtures.sweeps import documented_stacks  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mzsane"
JOBS = sorted(glob.glob(str(ROOT / "jobs" / "*.yaml")))
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# The chart's defaults hold no grid (a default composition would merge into every sweep): values tested
# on their own are merged over this one point.
ONE_POINT = {"sweep": {"grid": {"zooSizes": [100], "compositions": {"mnist": {"zoos": ["mnist-cnn_s"]}}}}}


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
    crd = yaml.load(kuberay.crd_file("ray.io_rayjobs.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _render(values: dict | None, release: str = "sweep1", api_versions: tuple[str, ...] = (),
            chart_dir: Path = CHART) -> list[dict]:
    """helm template; api_versions as with --api-versions (Chart.render has no such argument, the native
    call it wraps does)."""
    from helm_python import _native

    chart = helm_python.Chart.load(str(chart_dir))
    opts = {"name": release, "namespace": "mzsane", "api_versions": list(api_versions)}
    out = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts)))
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
    for obj in objs + _render(values, api_versions=("monitoring.coreos.com/v1",)):
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
    assert seen == {(s, tuple(c["zoos"])) for s in grid["zooSizes"] for c in grid["compositions"].values()}
    job = jobs[0]
    point = job["metadata"]["labels"]["mzsane.io/point"]
    assert job["spec"]["entrypoint"] == "python -m mzsane.sweep run-point /etc/mzsane/point.json"
    assert job["metadata"]["annotations"]["mzsane.io/results"] == f"s3://mzsane/data/sweeps/grid/{point}"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_config_axes_multiply_points_and_land_in_the_config():
    values = _values(str(ROOT / "jobs" / "norm-ablation.yaml"))
    objs = _render(values)
    modes = [yaml.safe_load(o["data"]["overrides.yaml"])["loss"]["norm_mode"] for o in objs if o["kind"] == "ConfigMap"]
    assert sorted(modes) == sorted(values["sweep"]["grid"]["axes"]["loss.norm_mode"]["values"])
    from mzsane import config, presets

    # the resolved overrides load into a real Config (no unknown keys, valid values)
    cm = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = config.from_dict(yaml.safe_load(cm["data"]["overrides.yaml"]), base=presets.small())
    assert cfg.data.zoos == values["sweep"]["grid"]["compositions"]["mixed"]["zoos"]


def test_long_names_are_truncated_dns_safe_and_unique():
    name = "a-very-long-sweep-name-about-zoo-size-and-composition-study-x"
    values = _values(str(ROOT / "jobs" / "grid.yaml"))
    values["sweep"]["name"] = name
    values["sweep"]["grid"]["compositions"]["mnist+fashion_mnist+animal_mnist+mnist-resnet_mini-all-four"] = {
        "zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s", "animal_mnist-cnn_s", "mnist-resnet_mini"]}
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
        assert ports == {"metrics": 8080, "mzsane-r0": 9500}  # KubeRay's name for Ray's 8080; one rank per CPU pod


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


def test_podmonitor_only_where_the_api_exists_and_scrapes_what_pods_declare():
    values = _values(str(ROOT / "jobs" / "zoo-size.yaml"))
    assert not [o for o in _render(values) if o["kind"] == "PodMonitor"]  # no monitoring.coreos.com/v1
    values["worker"] = {"replicas": 2, "resources": {"cpu": "8", "memory": "32Gi", "gpu": 2}}
    values["head"] = {"resources": {"cpu": "2", "memory": "8Gi", "gpu": 1}}
    objs = _render(values, api_versions=("monitoring.coreos.com/v1",))
    (monitor,) = [o for o in objs if o["kind"] == "PodMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # kube-prometheus-stack selects it
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics", "as-metrics", "dash-metrics", "mzsane-r0", "mzsane-r1"]
    for e in endpoints:
        assert {r["targetLabel"] for r in e["relabelings"]} >= {"sweep", "point", "ray_io_cluster"}
    declared = set()
    for job in _rayjobs(objs):
        for pod in list(_pods(job))[:2]:
            declared |= {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in endpoints} <= declared


@pytest.mark.parametrize("values,needle", [
    ({"sweep": {"grid": {"zooSizes": [-50]}}}, "/sweep/grid/zooSizes/0"),
    ({"sweep": {"grid": {"compositions": {"c": {"zoos": ["cifar11-cnn_s"]}}}}}, "cifar11-cnn_s"),
    ({"sweep": {"targetZoo": "mnist-vit"}}, "mnist-vit"),
    ({"worker": {"resources": {"cpu": "1 core"}}}, "1 core"),
    ({"head": {"resources": {"memory": "-8Gi"}}}, "-8Gi"),
    ({"sweep": {"name": "s" * 64}}, "/sweep/name"),
    ({"sweep": {"name": "Bad_Name"}}, "Bad_Name"),
    ({"storage": {"s3": {"credentialsSecret": None}}}, "credentialsSecret"),
    ({"storage": {"s3": {"credentialsSecret": {"name": ""}}}}, "/storage/s3/credentialsSecret/name"),
    ({"sweep": {"runs": {"n100-mnist": {"zooSize": 5, "zoos": ["mnist-cnn_s"]}}}}, "n100-mnist"),  # = a grid point
    ({"sweep": {"grid": {"compositions": {"mnist": None}}}}, "sweep.grid.zooSizes [100] is set"),  # all deleted
    ({"sweep": {"runs": {"Bad_Run": {"zooSize": 5, "zoos": ["mnist-cnn_s"]}}}}, "Bad_Run"),
    ({"sweep": {"runs": {"typo": {"set": {"train.lr": 0.1}}}}}, "/sweep/runs/typo"),  # an overlay's unknown run
    ({"sweep": {"grid": {"compositions": {"a b": {"zoos": ["mnist-cnn_s"]}}}}}, "a b"),
    ({"sweep": {"grid": {"axes": {"seed": {"values": [0], "order": -1}}}}}, "/sweep/grid/axes/seed/order"),
    ({"sweep": {"runs": [{"name": "r", "zooSize": 5, "zoos": ["mnist-cnn_s"]}]}}, "sweep.runs is a list"),
    ({"sweep": {"gird": {}}}, "gird"),
    ({"head": {"replicas": 2, "resources": {"cpu": "1", "memory": "1Gi"}}}, "replicas"),
    ({"worker": {"resources": {"cpu": "0", "memory": "1Gi"}}}, "/worker/resources/cpu"),
    ({"worker": {"resources": {"cpu": "2", "memory": "0"}}}, "/worker/resources/memory"),
    ({"worker": {"resources": {"cpu": "2", "memory": 1073741824}}}, "/worker/resources/memory"),  # 1.07e+09
    ({"worker": {"resources": {"cpu": "1", "memory": "8Gi", "gpu": 2}},
      "head": {"resources": {"cpu": "1", "memory": "8Gi", "gpu": 1}}},
     "worker.resources.cpu 1 is below its GPU count 2"),
    ({"sweep": {"targetZoo": "cifar10-cnn_s"}}, "cifar10-cnn_s"),  # no such dataset to build it from
    ({"sweep": {"targetZoo": "mnist-resnet18"}}, "mnist-resnet18"),  # 3x32x32 net, 1x28x28 data
    ({"sweep": {"config": {"train": {"num_step": 10}}}}, "num_step"),
    ({"sweep": {"config": {"loss": {"norm_mode": "bogus"}}}}, "/sweep/config/loss/norm_mode"),
    ({"sweep": {"config": {"cluster": {"num_workers": 8}}}}, "num_workers"),  # the chart sets it (worker.replicas)
    ({"sweep": {"runs": {"r": {"zooSize": 5, "zoos": ["mnist-cnn_s"], "set": {"train.num_step": 1}}}}},
     "train.num_step"),
    ({"sweep": {"grid": {"axes": {"loss.norm_mode": {"values": ["bogus"]}}}}},
     "/sweep/grid/axes/loss.norm_mode/values/0"),
    ({"sweep": {"grid": {"axes": {"train.lr": {"values": ["fast"]}}}}}, "/sweep/grid/axes/train.lr/values/0"),
    ({"sweep": {"grid": {"axes": {"loss.norm_mod": {"values": ["token"]}}}}}, "'loss.norm_mod' not allowed"),
    ({"metrics": {"port": 12000}}, "/metrics/port"),  # inside Ray's worker ports 10002-19999
    ({"job": {"rayAuth": True, "rayVersion": "2.50.0"}}, "job.rayAuth needs Ray 2.52.0"),
])
def test_bad_values_are_rejected_naming_the_value(values, needle):
    with pytest.raises(helm_python.HelmError) as err:
        _render(overlay.merge(ONE_POINT, values))
    assert needle in str(err.value)


def test_good_values_at_the_schema_edges_render():
    for values in ({"worker": {"replicas": 1, "resources": {"cpu": 0.5, "memory": "1Gi"}}},
                   {"worker": {"replicas": 1, "resources": {"cpu": "500m", "memory": "1.5Gi"}}},
                   {"sweep": {"config": {"train": {"lr": 0.001}}, "grid": {"zooSizes": [10], "compositions": {
                       "mnist-cnn_s+fashion_mnist-cnn_s": {"zoos": ["mnist-cnn_s", "fashion_mnist-cnn_s"]}},
                       "axes": {"train.num_steps": {"values": [10, 20], "order": 999999999}}}}},
                   {"metrics": {"port": 20000}, "job": {"rayAuth": False, "queueName": "q"}}):
        jobs = _rayjobs(_render(overlay.merge(ONE_POINT, values)))
        assert jobs
        for job in jobs:
            _check_rayjob(job)


STACKS = documented_stacks()


def _points(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["data"]) for o in objs if o["kind"] == "ConfigMap"]


@pytest.mark.parametrize("stack", STACKS, ids=["+".join(Path(f).stem for f in s) for s in STACKS])
def test_stacked_values_files_give_the_same_points_through_helm_and_sweep_run(stack, tmp_path):
    """sweep run merges -f files itself (mzsane/sweep/overlay.py, Helm's mergeMaps); here Helm's own value
    handling stacks them instead: each file but the last is coalesced over the chart's values by Helm and
    becomes the next layer's chart values, the last is rendered over them. Same points, names and order."""
    assert len(STACKS) >= 10
    layered = tmp_path / "mzsane"
    shutil.copytree(CHART, layered)
    for path in stack[:-1]:
        merged = helm_python.Chart.load(str(layered)).merge_values(_values(str(ROOT / path)))
        (layered / "values.yaml").write_text(yaml.safe_dump(merged))
    by_helm = _points(_render(_values(str(ROOT / stack[-1])), release="mzsane", chart_dir=layered))
    by_sweep_run = _points(sweep.render([str(ROOT / p) for p in stack], release="mzsane"))
    assert [name for name, _ in by_helm] == [name for name, _ in by_sweep_run]
    assert by_helm == by_sweep_run


@pytest.mark.parametrize("section", ["sweep.runs", "sweep.grid.compositions", "sweep.grid.axes"])
def test_a_list_in_a_keyed_section_is_refused_by_the_chart_in_one_line(section):
    """helm install -f old.yaml (no mzsane in the way): the chart, not a schema type error, says how to convert."""
    entry = {"sweep.runs": {"name": "r", "zooSize": 5, "zoos": ["mnist-cnn_s"]},
             "sweep.grid.compositions": {"name": "c", "zoos": ["mnist-cnn_s"]},
             "sweep.grid.axes": {"path": "seed", "values": [0]}}[section]
    values: dict = {}
    node = values
    for key in section.split(".")[:-1]:
        node = node.setdefault(key, {})
    node[section.rsplit(".", 1)[1]] = [entry]
    with pytest.raises(helm_python.HelmError) as err:
        _render(overlay.merge(ONE_POINT, values))
    message = str(err.value).split("): ", 1)[1]
    assert message.startswith(f"{section} is a list") and "mzsane sweep convert -f" in message
    assert "\n" not in message.strip()


def test_sweep_render_goes_through_helm(tmp_path):
    objs = sweep.render([str(ROOT / "jobs" / "composition.yaml")], release="r1", namespace="ns1")
    kinds = [o["kind"] for o in objs]
    assert kinds[:8] == ["ConfigMap"] * 4 + ["RayJob"] * 4  # one point per composition
    assert sorted(kinds[8:]) == ["NetworkPolicy"] * 4 + ["Pod"]  # the Pod is the helm test hook
    assert {o["metadata"]["namespace"] for o in objs} == {"ns1"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: {grid: {zooSizes: [-1]}}\n")
    with pytest.raises(ConfigError, match="zooSizes/0") as err:
        sweep.render([str(bad)])
    assert "\n" not in str(err.value)


def test_deploy_manifests_validate():
    for path in sorted((ROOT / "deploy" / "object-store").glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                kubernetes_validate.validate(obj, "1.33.0", strict=True)


def _scrape_real_exporter() -> set[str]:
    """Start mzsane's own exporter (one rank, loopback, free port), log one step of every kind of key the
    training loop logs, and return the metric family names its HTTP endpoint serves."""
    import urllib.request

    from mzsane import metrics

    sink = metrics.PrometheusSink("contract-run", world_rank=0, host="127.0.0.1", port=0)
    try:
        sink.log({"train/loss": 1.0, "train/loss_recon": 0.5, "val/loss": 1.1, "train/lr": 1e-3,
                  "train/grad_norm": 2.0, "perf/tokens_per_s": 10.0, "perf/data_wait_fraction": 0.1,
                  "perf/data_wait_s": 0.2, "perf/step_time_s": [0.05, 0.06], "train/samples": 8, "train/steps": 2,
                  "checkpoint/save_s": 0.3, "mem/host_rss_bytes": 1e8, "mem/gpu_bytes": 0.0,
                  "train/target_steps": 4, "checkpoint/last_time": 1.7e9, "data/read_bytes": 100, "data/rows": 1},
                 step=2)
        text = urllib.request.urlopen(f"http://{sink.target}/metrics", timeout=10).read().decode()
    finally:
        sink.close()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("mzsane_")}


def test_dashboard_and_monitoring_read_metrics_the_real_exporter_serves():
    served = _scrape_real_exporter()
    assert "mzsane_train_step" in served and "mzsane_perf_step_time_seconds_bucket" in served
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "mzsane-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") if isinstance(v.get("query"), str) else v.get("query", {}).get("query", "")
              for v in dashboard.get("templating", {}).get("list", [])]
    for path in sorted((ROOT / "deploy" / "prometheus").glob("rules*")):
        exprs += re.findall(r"expr:\s*(.+)", path.read_text())
    used = {m for e in exprs for m in re.findall(r"mzsane_\w+", e)}
    assert used and used <= served, sorted(used - served)


def test_sweep_render_rejects_unknown_config_paths(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("sweep: {grid: {axes: {loss.norm_mod: {values: [token]}}}}\n")
    with pytest.raises(ConfigError, match=r"/sweep/grid/axes.*'loss.norm_mod' not allowed"):  # by the schema
        sweep.render([str(bad)])


def test_deploy_scrape_configs_use_the_charts_ports_and_target_labels():
    """deploy/prometheus/ (for Prometheus set up by hand) scrapes the same ports with the same target labels
    as the chart's own PodMonitor, for up to 8 local ranks per pod."""
    values = _values(str(ROOT / "jobs" / "zoo-size.yaml"))
    values["worker"] = {"replicas": 1, "resources": {"cpu": "8", "memory": "32Gi", "gpu": 8}}
    values["head"] = {"resources": {"cpu": "2", "memory": "8Gi", "gpu": 1}}
    (chart,) = [o for o in _render(values, api_versions=("monitoring.coreos.com/v1",)) if o["kind"] == "PodMonitor"]
    chart_ports = [e["port"] for e in chart["spec"]["podMetricsEndpoints"]]
    chart_labels = {r["targetLabel"] for r in chart["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    (deploy,) = yaml.safe_load_all((ROOT / "deploy" / "prometheus" / "podmonitor.yaml").read_text())
    assert [e["port"] for e in deploy["spec"]["podMetricsEndpoints"]] == chart_ports
    for endpoint in deploy["spec"]["podMetricsEndpoints"]:
        assert {r["targetLabel"] for r in endpoint["relabelings"]} == chart_labels
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus-in-cluster.yml").read_text())
    (job,) = scrape["scrape_configs"]
    port_rule = next(r for r in job["relabel_configs"]
                     if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
    assert all(re.fullmatch(port_rule["regex"], p) for p in [*chart_ports, "mzsane-r15"])
    assert not re.fullmatch(port_rule["regex"], "dashboard")
    replaced = {r["target_label"] for r in job["relabel_configs"] if r.get("target_label")}
    assert chart_labels <= replaced
