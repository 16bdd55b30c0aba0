"""The smoke point driven by KubeRay's own reconcilers (ray-operator v1.6.2), its pods' commands run for real.

The harness (tests/operator, ``run`` mode) loads what the chart renders for ``jobs/smoke.yaml`` + its local
overlay, runs the RayJob and RayCluster reconcilers, and plays the kubelet: the head and worker pods' ``ray
start`` and the submitter's ``bash -ce`` string run exactly as the operator wrote them, each pod in network,
mount and PID namespaces of its own (ConfigMap at /etc/mzsane, Service names in /etc/hosts), the chart's S3
endpoint name forwarded to the session's SeaweedFS, and the RayJob reconciler's real dashboard client talks
to the head's real Ray dashboard. The point must reach SUCCEEDED with every stage's output on S3 and be read
by ``sweep report``; a point whose training fails must end FAILED.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from urllib.parse import urlparse

import pytest
import yaml

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.sweep import prerequisites, render, report
from mzsane.sweep.point import rendered_points
from tests.conftest import requires
from tests.fixtures.operator import made_for, run_harness

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S3_NAME = "seaweedfs-s3.mzsane.svc.cluster.local:8333"  # the chart's default storage.s3.endpoint
FILES = [os.path.join(ROOT, "jobs", "smoke.yaml"), os.path.join(ROOT, "jobs", "local", "smoke.yaml")]


def _render(root: str, sets: list[str]) -> list[dict]:
    return render(FILES, release="op", namespace="mzsane", sets=[f"storage.root={root}",
                                                                   f"storage.shardsUrl={root}/shards/tiny", *sets])


def _prepare(docs: list[dict]) -> None:
    """The tiny zoos and shards the point reads, as `mzsane sweep run` prepares them."""
    points = rendered_points(docs)
    configs = {p.name: config_mod.from_dict(p.overrides, base=presets.PRESETS[p.preset]()) for p in points}
    extra = {p.name: p.extra_target_zoos for p in points}
    prerequisites.ensure(configs, log=lambda s: print(f"prerequisites: {s}"), extra_targets=extra)


def _secret(s3) -> dict:
    """The Secret the chart's S3 env reads (values storage.s3.credentialsSecret), with the session's keys."""
    data = {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mzsane-s3", "namespace": "mzsane"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def _run(kuberay_harness, s3, docs, tmp_path, timeout_s: float) -> dict:
    requires("root for the harness's network namespaces", os.geteuid() == 0, "run the e2e tests as root (CI does)")
    requires("iproute2 and unshare", bool(shutil.which("ip") and shutil.which("unshare")),
             "apt-get install iproute2 util-linux")
    target = urlparse(s3.endpoint).netloc
    bin_dir = os.path.dirname(sys.executable)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    result = run_harness(kuberay_harness, "run", [*docs, _secret(s3)], tmp_path / "harness", timeout_s=timeout_s,
                         work=tmp_path / "pods", env=env, extra=["-forward", f"{S3_NAME}={target}"])
    print(result["log"][-6000:])
    return result


@pytest.mark.timeout(1500)
def test_smoke_point_runs_on_the_operators_pods_and_succeeds(kuberay_harness, s3_server, tmp_path):
    root = s3_server.url("op-smoke")
    docs = _render(root, [])
    _prepare(docs)
    result = _run(kuberay_harness, s3_server, docs, tmp_path, timeout_s=1200)
    assert result["returncode"] == 0, result["log"][-3000:]
    (name,) = [d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"]
    steps = [(s["jobDeploymentStatus"], s["jobStatus"]) for s in result["status"][f"mzsane/{name}"]]
    deployment = [d for i, (d, _) in enumerate(steps) if i == 0 or steps[i - 1][0] != d]
    assert deployment == ["", "Initializing", "Running", "Complete"], steps  # no retry, no failure on the way
    jobs = [j for i, (_, j) in enumerate(steps) if j and (i == 0 or steps[i - 1][1] != j)]
    assert jobs[-2:] == ["RUNNING", "SUCCEEDED"] and set(jobs) <= {"PENDING", "RUNNING", "SUCCEEDED"}, steps
    made = made_for(result, name)
    assert len(made["pods"]) == 2  # the head and the one worker the operator made

    # what every stage wrote: the point record, the backbone run, samples, evaluation, probe
    results = next(d for d in docs if d["kind"] == "RayJob")["metadata"]["annotations"]["mzsane.io/results"]
    run_dir = storage.join(root, "runs", "smoke-smoke")  # the backbone: {root}/runs/{sweep}-{point}
    assert any(p.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_") for p in storage.listdir(run_dir)), run_dir
    for part in ("point.json", "sample_results.json", "evaluate/results.json", "probe/probe.json"):
        assert storage.exists(storage.join(results, *part.split("/"))), (part, storage.listdir(results))
    table = report(results.rsplit("/", 1)[0], str(tmp_path / "report"))
    assert table and json.dumps(table)


@pytest.mark.timeout(900)
def test_smoke_point_whose_training_fails_ends_failed(kuberay_harness, s3_server, tmp_path):
    root = s3_server.url("op-smoke-fail")
    docs = _render(root, [])
    _prepare(docs)
    for d in docs:  # an override `mzsane train` refuses: the point's training stage exits non-zero
        if d["kind"] == "ConfigMap":
            over = yaml.safe_load(d["data"]["overrides.yaml"]) or {}
            over.setdefault("train", {})["num_steps"] = -5
            d["data"]["overrides.yaml"] = yaml.safe_dump(over)
    result = _run(kuberay_harness, s3_server, docs, tmp_path, timeout_s=600)
    (name,) = [d["metadata"]["name"] for d in docs if d["kind"] == "RayJob"]
    seq = result["status"][f"mzsane/{name}"]
    steps = [(s["jobDeploymentStatus"], s["jobStatus"]) for s in seq]
    assert steps[-1] == ("Failed", "FAILED"), steps
    assert "stage train exited" in seq[-1]["message"], seq[-1]["message"]
    retries = next(d for d in docs if d["kind"] == "RayJob")["spec"].get("backoffLimit", 0)
    assert [d for d, _ in steps].count("Retrying") == retries, steps  # the chart's backoffLimit: one more try
