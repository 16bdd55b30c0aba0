"""``launch.connect_ray``, the one ``ray.init`` (issue 27): the arguments training, ``sweep run`` and the benchmarks
each passed before, read from a recording ``ray.init`` (no Ray is started here; tests/integration starts real ones)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from mzsane import config as config_mod
from mzsane import presets
from mzsane.errors import ClusterError
from mzsane.train import launch

ray = pytest.importorskip("ray")
QUIET = {"configure_logging": False, "log_to_driver": False}


@pytest.fixture
def calls(monkeypatch):
    """What reaches Ray: each ``ray.init``'s keyword arguments, and ``"shutdown"``; the cluster has 3 CPUs."""
    seen: list = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.append("shutdown"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.2:6379"))
    return seen


def test_a_local_instance_runs_on_the_loopback_node_ip_without_dashboard_or_logs(calls):
    assert launch.connect_ray("", "127.0.0.5", 2) == ("127.0.0.2:6379", 3.0)
    assert calls == [{"address": "local", "num_cpus": 2, "include_dashboard": False, "_node_ip_address": "127.0.0.5",
                      **QUIET}]


def test_a_joined_cluster_gets_a_training_jobs_env_and_streams_its_workers_output(calls):
    assert launch.connect_ray("10.0.0.1:6379", "127.0.0.2", 2, job_env={"K": "v"}) == ("10.0.0.1:6379", 3.0)
    assert launch.connect_ray("10.0.0.1:6379", "127.0.0.2", 2) == ("10.0.0.1:6379", 3.0)
    assert calls == [{"address": "10.0.0.1:6379", "runtime_env": {"env_vars": {"K": "v"}}, "log_to_driver": True},
                     {"address": "10.0.0.1:6379", **QUIET}]


def test_ray_connection_disconnects_after_the_block_even_when_it_fails(calls):
    with launch.ray_connection("", "127.0.0.2", 1) as (address, cpus):
        assert (address, cpus, calls[-1]["num_cpus"]) == ("127.0.0.2:6379", 3.0, 1)
    assert calls[-1] == "shutdown"
    with pytest.raises(KeyError), launch.ray_connection("h:1", "127.0.0.2", 1):
        raise KeyError("inside")
    assert calls[-2:] == [{"address": "h:1", **QUIET}, "shutdown"]


@pytest.mark.parametrize(("address", "where"), [("h:1", "join the Ray cluster at 'h:1'"), ("", "start local Ray")])
def test_a_refused_connection_is_one_line_naming_the_setting(monkeypatch, address, where):
    def refuse(**kwargs):
        raise ConnectionError("no GCS answered\nsecond line")

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ClusterError) as info:
        launch.connect_ray(address, "127.0.0.2", 1, setting="cluster.address / --address")
    assert str(info.value) == (f"cannot {where} (no GCS answered); check cluster.address / --address and "
                               "RAY_AUTH_MODE")


def test_training_refuses_a_cluster_smaller_than_its_workers(calls, monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")  # restored after: _init_ray sets it for Ray Train
    for name in launch._FORWARD_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MZSANE_S3_ENDPOINT", "http://127.0.0.1:9")  # a setting workers need: forwarded
    cfg = config_mod.load(presets.tiny(), [], ["cluster.num_workers=2", "cluster.cpus_per_worker=2"])
    with pytest.raises(ClusterError, match="2 workers x 2 CPUs need 4 CPUs but the Ray cluster has 3"):
        launch._init_ray(cfg, "h:1")
    env = {**launch.HEALTH_CHECK_ENV, "MZSANE_S3_ENDPOINT": "http://127.0.0.1:9"}
    assert calls == [{"address": "h:1", "runtime_env": {"env_vars": env}, "log_to_driver": True}, "shutdown"]
