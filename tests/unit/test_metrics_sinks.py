"""Rank exporters bind base port + local rank; rank 0's log.jsonl holds every step once after a resume."""
from __future__ import annotations

import json
import socket
import urllib.request

from mzsane import metrics, storage


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def test_exporter_port_is_base_plus_local_rank_not_world_rank():
    port = _free_port_pair()
    sink = metrics.PrometheusSink("r", world_rank=5, host="127.0.0.1", port=port, local_rank=1)
    try:
        assert sink.port == port + 1 and sink.target == f"127.0.0.1:{port + 1}"
        sink.log({"train/loss": 1.0}, step=1)
        body = urllib.request.urlopen(f"http://{sink.target}/metrics", timeout=5).read().decode()
        assert 'world_rank="5"' in body  # the label keeps the global identity
    finally:
        sink.close()


def test_node_host_binds_the_ranks_node_address():
    class Cfg:
        enabled, host, port = True, "node", 0

    fan, target = metrics.make_sink(Cfg, "r", "memory://unused-run", world_rank=1, local_rank=0, node="127.0.0.3")
    try:
        assert target.startswith("127.0.0.3:")
    finally:
        fan.close()


def _steps(url: str) -> list[int]:
    return [json.loads(line)["step"] for line in storage.read_text(url).splitlines()]


def test_log_jsonl_is_idempotent_per_step_after_a_resume(root):
    url = storage.join(root, "run", "log.jsonl")
    first = metrics.JsonlSink(url)
    for step in range(1, 9):
        first.log({"train/loss": 1.0 / step}, step)
    if storage.local_path(url):  # a killed writer can leave a torn last line
        with open(storage.local_path(url), "a", encoding="utf-8") as fh:
            fh.write('{"step": 9, "train/lo')
    # the run resumes from its step-5 checkpoint and redoes steps 6..8
    resumed = metrics.JsonlSink(url, start_step=5)
    assert _steps(url) == [1, 2, 3, 4, 5]
    for step in range(6, 10):
        resumed.log({"train/loss": 0.5}, step)
    assert _steps(url) == list(range(1, 10))
