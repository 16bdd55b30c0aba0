"""``mzsane train`` for real: Ray Train DDP on a two-node Ray cluster (127.0.0.2 head, 127.0.0.3 worker
node), token shards and checkpoints in SeaweedFS S3, a worker process SIGKILLed mid-run, Prometheus
scraping every rank. One Ray cluster for the module; everything on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pytest

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.errors import ClusterError, ConfigError, DataError, StorageError
from mzsane.train import checkpoint as ckpt
from mzsane.train import launch
from tests.fixtures.zoos import make_shards

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]

INTERVAL = 20


@pytest.fixture(scope="module")
def shards_root(s3_server):
    root = s3_server.url("train-it")
    make_shards(root)
    return root


def _cfg(root: str, run: str) -> config_mod.Config:
    cfg = config_mod.load(presets.tiny())
    cfg.storage.root = root
    cfg.run_name = run
    cfg.cluster.num_workers = 2
    cfg.cluster.max_failures = 2
    # 480 steps: 14 s on 2 idle cores (35 steps/s), about a minute under load; Prometheus must see both ranks
    # (file_sd sync + refresh + scrape, <= 3 s) and a kill must land mid-run even on an idle machine
    cfg.train.num_steps = 480
    cfg.train.lr = 3e-3
    cfg.train.checkpoint_every_n_steps = INTERVAL
    cfg.train.eval_every_n_steps = 20
    cfg.train.log_every_n_steps = 2
    cfg.metrics.host = "127.0.0.1"
    cfg.metrics.port = 0
    return cfg


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _workers(run_url: str) -> dict[int, dict]:
    out = {}
    for name in storage.listdir(storage.join(run_url, "workers")):
        info = storage.read_json(storage.join(run_url, "workers", name))
        out[info["world_rank"]] = info
    return out


def _log(run_url: str) -> list[dict]:
    url = storage.join(run_url, "log.jsonl")
    return [json.loads(line) for line in storage.read_text(url).splitlines()] if storage.exists(url) else []


def test_ddp_on_two_nodes_survives_a_killed_worker(s3_server, shards_root, ray_cluster, prometheus_server, tmp_path):
    run = f"it-{int(time.time())}"
    cfg = _cfg(shards_root, run)
    run_url = storage.join(shards_root, "runs", run)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["url"] = launch.train(cfg, address=ray_cluster.address)
        except BaseException as err:  # surfaced by the assertion below
            outcome["error"] = err

    # Prometheus runs before training starts (as on a cluster), discovering the ranks' endpoints from the
    # run's metrics_targets.json, which a side thread mirrors into its file_sd file for the whole run:
    # the tiny preset trains in seconds, so a server started afterwards could miss the ranks entirely.
    file_sd = str(tmp_path / "targets.json")
    with open(file_sd, "w", encoding="utf-8") as fh:
        fh.write("[]")
    prom = prometheus_server(file_sd, wait_up=False)
    stop_sync = threading.Event()

    def sync_targets() -> None:
        url = storage.join(run_url, "metrics_targets.json")
        while not stop_sync.wait(0.5):
            with contextlib.suppress(Exception):
                if storage.exists(url):
                    with open(file_sd + ".tmp", "w", encoding="utf-8") as fh:
                        fh.write(storage.read_text(url))
                    os.replace(file_sd + ".tmp", file_sd)

    syncer = threading.Thread(target=sync_targets, daemon=True)
    syncer.start()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    # ---- both ranks up, on two different nodes, exporting metrics that Prometheus scrapes
    first = _wait(lambda: len(_workers(run_url)) == 2 and _workers(run_url), 240, "two workers")
    assert {w["node"] for w in first.values()} == {"127.0.0.2", "127.0.0.3"}
    # last_over_time: a series scraped once counts even after its rank has moved on (staleness would hide it)
    ranks = prom.wait_for(f'last_over_time(mzsane_train_step{{run="{run}"}}[10m])',
                          lambda r: {m["metric"]["world_rank"] for m in r} == {"0", "1"}, timeout=60)
    assert all(float(m["value"][1]) >= 1 for m in ranks)
    for family in ('mzsane_train_loss{term="loss_recon"}', "mzsane_train_learning_rate",
                   "mzsane_perf_tokens_per_second", "mzsane_perf_data_wait_seconds_total",
                   "mzsane_train_samples_seen_total", "mzsane_perf_step_time_seconds_count",
                   "mzsane_host_rss_bytes"):
        result = prom.wait_for(f"last_over_time({family}[10m])",
                               lambda r: len({m["metric"]["world_rank"] for m in r}) == 2, timeout=30)
        assert all(m["metric"]["run"] == run for m in result)
    # ---- a real process kill of rank 1 after the first checkpoint
    _wait(lambda: ckpt.latest_checkpoint_url(run_url), 120, "the first checkpoint")
    killed_after = max(row["step"] for row in _log(run_url))
    original = _workers(run_url)
    before = {w["pid"] for w in original.values()}
    victim = original[1]
    assert victim["start_step"] == 0
    os.kill(victim["pid"], signal.SIGKILL)
    # ---- replaced: new workers resume from the last checkpoint (not from scratch) and finish
    resumed = _wait(lambda: (w := _workers(run_url)) and not {x["pid"] for x in w.values()} & before and w, 240,
                    "the replacement worker group", poll=1.0)
    assert {w["start_step"] for w in resumed.values()} == {resumed[0]["start_step"]}
    assert resumed[0]["start_step"] % INTERVAL == 0
    assert killed_after - INTERVAL <= resumed[0]["start_step"] <= killed_after + INTERVAL
    thread.join(timeout=300)
    stop_sync.set()
    assert not thread.is_alive(), "training did not finish"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["url"] == run_url
    steps = [s for s, _ in ckpt.list_checkpoints(run_url)]
    folders = {s: storage.listdir(u) for s, u in ckpt.list_checkpoints(run_url)}  # an empty one: a failed prune
    assert steps[-1] == cfg.train.num_steps and len(steps) <= cfg.train.num_checkpoints_to_keep, folders
    log = _log(run_url)
    losses = [row["train/loss"] for row in log if "train/loss" in row]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert any("val/loss" in row for row in log)
    weights, state, saved = ckpt.load(ckpt.fetch(ckpt.latest_checkpoint_url(run_url), str(tmp_path / "ck")))
    assert state["step"] == cfg.train.num_steps and len(state["ranks"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    assert storage.exists(storage.join(run_url, "config.json")) and saved.run_name == run


def test_bad_inputs_fail_fast_with_one_line(s3_server, shards_root, ray_cluster, tmp_path, monkeypatch):
    cfg = _cfg(shards_root, "bad")
    cfg.cluster.num_workers = 3  # the cluster has 2 CPUs
    with pytest.raises(ClusterError, match="need 3 CPUs but the Ray cluster has 2"):
        launch.train(cfg, address=ray_cluster.address)
    cfg = _cfg(shards_root, "bad")
    cfg.tokens.tokensize = 32
    with pytest.raises(DataError, match=r"tokens of size 64 but tokens\.tokensize=32"):
        launch.train(cfg, address=ray_cluster.address)
    cfg = _cfg(shards_root, "bad")
    cfg.data.zoos = ["nope"]
    with pytest.raises(DataError, match="not in the shard dataset"):
        launch.train(cfg, address=ray_cluster.address)
    # no models: refused with the allowed range when the config loads, before any cluster is joined
    with pytest.raises(ConfigError, match="num_models_per_zoo") as err:
        config_mod.load(presets.tiny(), [], ["data.num_models_per_zoo=0"])
    assert "\n" not in str(err.value)
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    with pytest.raises(StorageError, match="unreachable") as err:
        launch.train(_cfg(shards_root, "bad"), address=ray_cluster.address)
    assert "\n" not in str(err.value)
