"""A two-node Ray cluster on loopback: a head at 127.0.0.2 and a worker node at 127.0.0.3, for ``mzsane bench
scale`` and the integration tests' ``ray_cluster`` fixture (tests/fixtures/ray_cluster.py).

Why two nodes on one machine: a 2-worker TorchTrainer then places one worker per node, as on a KubeRay
head + worker pod, so per-worker memory and start-up include a real cross-node placement. Every listener
on its own free port, the process's auth token, each ``ray start --block`` in its own session, stopped by
those sessions' process ids (never by name).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# Ray caches the auth token once per process (its AuthenticationTokenLoader): a process that starts or joins
# several loopback clusters one after another (a benchmark, a test session) must give them all the same token.
PROCESS_TOKEN = secrets.token_hex(32)


# how many nodes of the cluster at argv[1] are alive, once argv[2] are or at time argv[3]; joined through mzsane's
# one Ray connection, whose imports (torch) cost seconds: paid only once the head's GCS port answers, and once
# per wait rather than once per poll
_NODES_PROBE = """
import socket, sys, time
address, count, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
host, port = address.rsplit(":", 1)
socket.create_connection((host, int(port)), timeout=2).close()
import ray
from mzsane.train.launch import connect_ray
connect_ray(address, "", 0)
alive = lambda: sum(1 for n in ray.nodes() if n["Alive"])
while alive() < count and time.time() < until:
    time.sleep(0.5)
print(alive())
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """``start()``, pass ``address`` to ``mzsane train --address``, ``stop()``; ``env`` joins it."""

    def __init__(self, cpus_per_node: int = 1):
        self.cpus_per_node = cpus_per_node
        self.temp_dir = tempfile.mkdtemp(prefix="mzray-", dir="/tmp")  # Ray's socket paths must stay short
        self.token = PROCESS_TOKEN
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        self.address = ""
        self.metrics_targets: list[str] = []  # each node's Ray metrics export (host:port), for Prometheus
        self._procs: list[subprocess.Popen] = []

    def _common(self, ip: str) -> list[str]:
        metrics = _free_port(ip)
        self.metrics_targets.append(f"{ip}:{metrics}")
        return ["--disable-usage-stats", "--block", f"--num-cpus={self.cpus_per_node}",
                f"--ray-client-server-port={_free_port(ip)}", f"--dashboard-agent-listen-port={_free_port(ip)}",
                f"--dashboard-agent-grpc-port={_free_port(ip)}", f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={_free_port(ip)}"]

    def start(self) -> LoopbackCluster:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        env = dict(os.environ, **self.env)
        port = _free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{port}"
        log = open(os.path.join(self.temp_dir, "ray-start.log"), "ab")  # noqa: SIM115 (the children keep it)
        try:
            self._procs.append(subprocess.Popen(
                [ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
                 f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                 f"--dashboard-port={_free_port(HEAD_IP)}", *self._common(HEAD_IP)],
                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
            self._wait_nodes(1, env)
            self._procs.append(subprocess.Popen(
                [ray, "start", f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
                 *self._common(WORKER_IP)], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
            self._wait_nodes(2, env)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_nodes(self, count: int, env: dict, timeout: float = 120.0) -> None:
        deadline, last = time.time() + timeout, ""
        while time.time() < deadline:
            try:
                out = subprocess.run([sys.executable, "-c", _NODES_PROBE, self.address, str(count),
                                      str(min(deadline, time.time() + 25))], env=env, capture_output=True, text=True,
                                     timeout=30)
            except subprocess.TimeoutExpired:
                continue
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            last = out.stderr[-300:]
            time.sleep(1.0)
        raise RuntimeError(f"Ray cluster at {self.address} did not reach {count} nodes: {last}")

    def _session_pids(self) -> list[int]:
        sessions = {p.pid for p in self._procs}
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                        state = fh.read().rsplit(")", 1)[1].split()[0]
                    if state != "Z" and os.getsid(int(entry)) in sessions:
                        out.append(int(entry))
        return out

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in self._session_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait
            while self._session_pids() and time.time() < deadline:
                time.sleep(0.2)
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
