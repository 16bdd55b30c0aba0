"""A two-point sweep through the real pipeline: the chart renders the RayJobs, each point's entrypoint
(exactly as a RayJob's driver would run it: record-point -> train -> sample -> evaluate) runs against a
two-node Ray cluster on loopback with zoos, shards, runs and results in SeaweedFS S3, and
``mzsane sweep report`` turns what the points wrote into the table and the plot.

Only the mount point of the ConfigMap (/etc/mzsane) is replaced by a local folder holding the same files."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest
import yaml

from mzsane import presets
from mzsane import storage
from mzsane import sweep

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

SIZES = (1, 2)  # the tiny zoo holds 2 train models


def _build_data(root: str) -> None:
    from mzsane.shards.writer import build_shards
    from mzsane.zoo.build import build_zoos

    cfg = presets.tiny()
    cfg.zoo.datasets = ["mnist"]
    build_zoos(cfg.zoo, storage.join(root, "zoos"), show_progress=False)
    build_shards([storage.join(root, "zoos", "mnist-cnn_s")], storage.join(root, "shards", "default"), cfg.tokens,
                 cfg.shards, progress=False)


def _values(tmp_path, root: str) -> str:
    values = {
        "sweep": {"name": "it-sweep", "preset": "tiny", "targetZoo": "mnist-cnn_s",
                  "grid": {"zooSizes": list(SIZES), "compositions": [{"zoos": ["mnist-cnn_s"]}]},
                  # a fit short enough for a test, still through Ray Train
                  "config": {"train": {"num_steps": 10, "checkpoint_every_n_steps": 10, "eval_every_n_steps": 10}}},
        "storage": {"root": root},
        "worker": {"replicas": 1, "resources": {"cpu": "1", "memory": "2Gi"}},
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _run_point(config_map: dict, rayjob: dict, etc: str, env: dict[str, str]) -> None:
    os.makedirs(etc, exist_ok=True)
    for name, text in config_map["data"].items():
        with open(os.path.join(etc, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    command = rayjob["spec"]["entrypoint"].replace("/etc/mzsane/", etc + "/")
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"point {rayjob['metadata']['name']} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_two_point_sweep_runs_and_reports(s3_server, ray_cluster, tmp_path):
    root = s3_server.url("sweep-it")
    _build_data(root)
    objects = sweep.render([_values(tmp_path, root)])
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert len(jobs) == len(SIZES)
    for job in jobs:
        assert "cluster.address" not in job["spec"]["entrypoint"]
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "RAY_ADDRESS": ray_cluster.address,
           "PYTHONPATH": os.getcwd()}
    for job in jobs:
        name = job["metadata"]["name"]
        _run_point(maps[name], job, str(tmp_path / "etc" / name), env)

    results = storage.join(root, "sweeps", "it-sweep")
    out = str(tmp_path / "report")
    report = sweep.report(results, out)
    generated = [r for r in report["rows"] if r["method"] == "generated"]
    assert sorted(r["zoo_size"] for r in generated) == list(SIZES)
    assert all(r["composition"] == "mnist-cnn_s" and 0.0 <= r["test_acc_mean"] <= 1.0 for r in generated)
    assert not report["pending"]
    rows = list(csv.DictReader(io.StringIO(open(report["csv"], encoding="utf-8").read())))
    assert {int(r["zoo_size"]) for r in rows} == set(SIZES)
    with open(report["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # each point trained on exactly the zoo size it names
    for size in SIZES:
        point = next(p for p in storage.listdir(results) if p.startswith(f"n{size}-"))
        meta = storage.read_json(storage.join(results, point, "point.json"))
        assert meta["zoo_size"] == size
