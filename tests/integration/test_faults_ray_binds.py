"""What the local Ray that ``mzsane train`` starts listens on (issue 28, item 7), read from the kernel.

mzsane starts it on the loopback node IP 127.0.0.2 without the dashboard. Ray 2.60 itself offers no setting for the
address of its core gRPC servers: the GCS, the raylet, every core worker (the driver included) and the dashboard
agent listen on all interfaces for any node IP other than 127.0.0.1, which ``ray.init`` replaces by the host's
own address (its token authentication, on by default in 2.60, guards them); the autoscaler monitor and the
head's dashboard process (started without its web frontend when the dashboard is off) serve metrics on all
interfaces too. So the check is: nothing beyond that set listens outside loopback (no dashboard frontend, no
Ray Client server, the runtime-env agent on the node IP), and the set is printed for the fault table."""
from __future__ import annotations

import os
import sys

import pytest

from mzsane import config as config_mod
from mzsane import presets
from mzsane.train import launch
from tests.fixtures.sockets import descendants, process_listeners

pytestmark = [pytest.mark.integration, pytest.mark.ray,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]

# the Ray processes whose listeners Ray 2.60 binds to all interfaces whatever mzsane asks
# (the autoscaler monitor and the head's dashboard process, which runs without its frontend even with the dashboard
# off, serve Prometheus metrics on fixed ports 44217 / 44227 of every interface)
RAY_CORE = ("gcs_server", "raylet", "ray::", "dashboard/agent.py", "DashboardAgent", "default_worker.py",
            "autoscaler/_private/monitor.py", "dashboard/dashboard.py")


def _loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def test_local_ray_listens_outside_loopback_only_where_ray_gives_no_choice(tmp_path):
    import ray

    cfg = config_mod.load(presets.tiny(), [], ["cluster.num_workers=1"])
    launch._init_ray(cfg, "")
    try:
        @ray.remote
        def ping() -> int:
            return os.getpid()

        ray.get(ping.remote())  # a core worker is up
        found = process_listeners(descendants(os.getpid()))
    finally:
        ray.shutdown()
    me = os.getpid()
    outside = [(pid, cmd, addr, port) for pid, cmd, addr, port in found if not _loopback(addr)]
    print("\nlocal Ray listeners outside loopback (Ray 2.60 core, no setting):")
    for pid, cmd, addr, port in outside:
        print(f"  {addr}:{port}  {'driver' if pid == me else cmd[:70]}")
    assert found, "no listening socket found for the Ray processes"
    extra = [(cmd, addr, port) for pid, cmd, addr, port in outside
             if pid != me and not any(core in cmd for core in RAY_CORE)]
    assert not extra, f"listening outside loopback beyond Ray's core servers: {extra}"
    heads = [cmd for _, cmd, _, _ in found if "dashboard/dashboard.py" in cmd]
    assert all("--disable-frontend" in cmd for cmd in heads), "the dashboard's web frontend was started"
    assert not any(port in (8265, 10001) for *_, port in found), "dashboard or Ray Client port open"
    agents = [addr for _, cmd, addr, _ in found if cmd.startswith("ray::RuntimeEnvAgent")]
    assert agents and all(a == cfg.cluster.node_ip for a in agents), agents
