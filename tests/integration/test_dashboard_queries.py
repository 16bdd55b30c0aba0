"""Every PromQL expression of deploy/grafana/mzsane-dashboard.json returns data from a real Prometheus that
scraped a real 2-worker training run and the Ray cluster it ran on: a panel that would show nothing fails.

Set-up: a two-node Ray cluster on loopback (head 127.0.0.2, worker node 127.0.0.3, each exporting Ray's own
node metrics on its ``--metrics-export-port``), ``mzsane train`` with 2 Ray Train workers on the tiny preset,
each rank serving its exporter on ``metrics.port + local_rank`` at its node's address; Debian's Prometheus
scrapes the ranks and both
Ray nodes every second. After training, every panel's expression runs as Grafana runs it: a range query over
the run's time window, with ``$run`` set to the run and ``$__rate_interval`` to 10 s (4 scrape intervals + margin).

Panels that cannot have data on this machine are named in ``CLUSTER_ONLY`` with the reason; the test checks
that they say so in their description, that their PromQL parses, and that no other panel is excused.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import urllib.error

import pytest

from mzsane import config as config_mod
from mzsane import presets
from mzsane.loopback.ray_cluster import HEAD_IP, WORKER_IP, LoopbackCluster
from mzsane.train import launch
from tests.fixtures.prometheus import prometheus_server
from tests.fixtures.zoos import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "grafana", "mzsane-dashboard.json")
CLUSTER_ONLY = {
    "kuberay_job_deployment_status": "KubeRay operator metrics: only where the operator runs and is scraped",
    "ray_node_gpus_utilization": "Ray exports GPU series only on nodes with GPUs; this machine has none",
    "ray_node_gram_used": "Ray exports GPU series only on nodes with GPUs; this machine has none",
}


def _free_on_both_nodes() -> int:
    """A port free on both loopback nodes: each rank is local rank 0 of its node and serves metrics.port there."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind((HEAD_IP, 0))
            port = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind((WORKER_IP, port))
                return port
            except OSError:
                continue
    raise RuntimeError("no port free on both nodes")


def _panels() -> list[tuple[str, str, str]]:
    """(panel title, description, expr) of every query target."""
    with open(DASHBOARD, encoding="utf-8") as fh:
        dashboard = json.load(fh)
    return [(p["title"], p.get("description", ""), t["expr"]) for p in dashboard["panels"]
            for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dash"))
    stack = contextlib.ExitStack()
    make_shards(root)
    saved = dict(os.environ)
    cluster = LoopbackCluster()
    try:
        cluster.start()
        os.environ.update(cluster.env)
        port = _free_on_both_nodes()
        prom = stack.enter_context(prometheus_server(
            [f"{HEAD_IP}:{port}", f"{WORKER_IP}:{port}", *cluster.metrics_targets],
            str(tmp_path_factory.mktemp("prometheus")), wait_up=False))
        cfg = config_mod.load(presets.tiny())
        cfg.storage.root, cfg.run_name = root, "dash-run"
        cfg.cluster.num_workers, cfg.cluster.address = 2, cluster.address
        # long enough for several scrapes of each rank at 1 s even on a loaded machine (a tiny step is milliseconds)
        cfg.train.num_steps, cfg.train.lr = 400, 3e-3
        cfg.train.log_every_n_steps, cfg.train.eval_every_n_steps, cfg.train.checkpoint_every_n_steps = 2, 20, 20
        cfg.metrics.host, cfg.metrics.port = "node", port  # port + local rank on each node's own address
        start = time.time()
        launch.train(cfg, address=cluster.address)
        # Ray's reporter publishes node metrics every few seconds: wait until both nodes were scraped
        prom.wait_for("count(max_over_time(ray_node_cpu_utilization[5m]))",
                      lambda r: bool(r) and float(r[0]["value"][1]) >= 2, timeout=90)
        yield prom, cfg.run_name, start - 5, time.time() + 1
    finally:
        stack.close()
        cluster.stop()
        os.environ.clear()
        os.environ.update(saved)


def _range(prom, expr: str, start: float, end: float) -> list[dict]:
    try:
        return prom.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1")["result"]
    except urllib.error.HTTPError as err:  # 400: the expression does not parse; say which and why
        raise AssertionError(f"query {expr!r} rejected: {err.read().decode()[:300]}") from None


def _substitute(expr: str, run: str) -> str:
    assert re.fullmatch(r"[a-z0-9-]+", run), "run names are DNS labels: no regex or PromQL escaping needed"
    return expr.replace("$run", run).replace("$__rate_interval", "10s")


def test_every_dashboard_query_returns_series(scraped_run):
    prom, run, start, end = scraped_run
    empty, excused = [], []
    for title, description, expr in _panels():
        query = _substitute(expr, run)
        cluster_only = [m for m in CLUSTER_ONLY if m in expr]
        result = _range(prom, query, start, end)  # parses (the API fails the call on a syntax error)
        if cluster_only:
            assert "cluster only" in description, f"panel {title!r} has no data locally and does not say so"
            excused.append(title)
            continue
        values = [float(v) for series in result for _, v in series["values"]]
        if not any(v == v for v in values):  # no series, or only NaN
            empty.append((title, query))
    assert not empty, f"panels without data: {empty}"
    assert sorted(excused) == ["GPU memory per pod", "GPU utilization per pod", "RayJobs by status (KubeRay)"]


def test_panels_cover_the_operators_questions(scraped_run):
    prom, run, start, end = scraped_run
    exprs = " ".join(e for _, _, e in _panels())
    for metric in ("mzsane_train_steps_total", "mzsane_perf_tokens_per_second", "mzsane_train_loss",
                   "mzsane_perf_data_wait_seconds_total", "mzsane_checkpoint_last_timestamp_seconds",
                   "mzsane_train_target_steps", "ray_node_cpu_utilization", "ray_node_mem_used",
                   "ray_node_gpus_utilization", "kuberay_job_deployment_status"):
        assert metric in exprs, metric
    # both ranks, per rank, with their own step rate; the run template variable lists the run
    per_rank = _range(prom, _substitute('rate(mzsane_train_steps_total{run=~"$run"}[$__rate_interval])', run),
                      start, end)
    assert sorted(s["metric"]["world_rank"] for s in per_rank) == ["0", "1"]
    assert run in prom.api("label/run/values", **{"match[]": "mzsane_train_step"})
    # the loss terms the loop logs all reach Prometheus
    terms = {s["metric"]["term"] for s in _range(prom, f'mzsane_train_loss{{run="{run}"}}', start, end)}
    assert {"loss", "loss_recon", "loss_contrast"} <= terms
