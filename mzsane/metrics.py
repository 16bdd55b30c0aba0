"""Training metrics behind one ``log(metrics, step)`` interface, fanned out to Prometheus and a JSON-lines log.

Why one interface: the loop should not know who watches it. Each rank exports its own Prometheus
endpoint (a scrape target per worker, as a KubeRay PodMonitor sees them) and rank 0 also appends to
``{run}/log.jsonl`` so a finished run can be read without a Prometheus server. This is the only module
that imports ``prometheus_client``.

Names: code keys are ``section/name`` (``train/loss``, ``perf/tokens_per_s``); Prometheus names are
``mzsane_<section>_<name>`` plus a unit suffix (``_seconds``, ``_total``, ``_bytes``). Labels are bounded:
``run`` and ``world_rank`` on every series, ``term`` on the loss family (a handful of loss terms), never
the step. Keys this module does not know (new debug values) still reach the JSON log; Prometheus gets
only the declared families so the series count stays fixed.

Scrape configuration (see also deploy/): locally, every rank's target is written to
``{run}/metrics_targets.json`` in Prometheus ``file_sd`` format::

    scrape_configs:
      - job_name: mzsane
        scrape_interval: 5s
        file_sd_configs: [{files: ["/path/to/runs/<run>/metrics_targets.json"]}]

On KubeRay set ``metrics.host=0.0.0.0`` and a fixed ``metrics.port``: the rank with local rank r serves
``port + r`` (each pod declares one port per rank *it* runs, so a PodMonitor finds every rank without
down targets). ``metrics.host=node`` binds the node's own address (several Ray nodes on one machine,
as in the loopback test cluster, can then share a port).

All interfaces (``0.0.0.0``/``::``) only inside Kubernetes (``KUBERNETES_SERVICE_HOST``, which the kubelet sets in
every pod): the chart asks for 0.0.0.0 so Prometheus reaches the pod IP, but ``sweep run`` runs the same rendered
config on a laptop, where it would expose the exporter to the network. Elsewhere it binds 127.0.0.1 unless
``MZSANE_METRICS_HOST`` says otherwise (e.g. ``0.0.0.0`` on a VM scraped from another host).
"""
from __future__ import annotations

import json
import os
import resource
import threading
import time
from typing import Any, Protocol

from mzsane import storage

# code key -> (prometheus name, kind, help). "loss" keys go to one gauge family labelled by term.
_GAUGES = {
    "train/step": ("mzsane_train_step", "optimizer steps completed"),
    "train/lr": ("mzsane_train_learning_rate", "learning rate of the first parameter group"),
    "train/grad_norm": ("mzsane_train_grad_norm", "global gradient norm before clipping"),
    "perf/tokens_per_s": ("mzsane_perf_tokens_per_second", "window tokens processed per second on this rank"),
    "perf/real_tokens_per_s": ("mzsane_perf_real_tokens_per_second",
                               "model tokens processed per second on this rank, padding positions excluded"),
    "perf/data_wait_fraction": ("mzsane_perf_data_wait_ratio", "fraction of step time spent waiting for data"),
    "checkpoint/save_s": ("mzsane_checkpoint_save_seconds", "seconds the last checkpoint took to save"),
    "mem/host_rss_bytes": ("mzsane_host_rss_bytes", "peak resident set size of this worker process"),
    "mem/gpu_bytes": ("mzsane_gpu_memory_bytes", "CUDA memory allocated by this worker"),
    "train/target_steps": ("mzsane_train_target_steps", "optimizer steps this run is planned to take (progress)"),
    "checkpoint/last_time": ("mzsane_checkpoint_last_timestamp_seconds",
                             "unix time the last checkpoint of this run was reported (checkpoint age)"),
}
_TOTALS = {  # code key holds a running total; the counter follows it (the loop does not track increments)
    "data/read_bytes": ("mzsane_data_read_bytes_total", "on-disk bytes of the shard row groups this rank read"),
    "data/rows": ("mzsane_data_rows_read_total", "checkpoint rows this rank read"),
}
_COUNTERS = {  # code key holds the increment since the last log call
    "perf/data_wait_s": ("mzsane_perf_data_wait_seconds_total", "seconds spent waiting for the next batch"),
    "train/samples": ("mzsane_train_samples_seen_total", "windows trained on by this rank"),
    "train/steps": ("mzsane_train_steps_total", "optimizer steps taken by this rank"),
}
_LOSS_PREFIXES = {"train/": "mzsane_train_loss", "val/": "mzsane_val_loss"}
_STEP_TIME_KEY = "perf/step_time_s"  # a list of per-step seconds since the last log call
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def host_rss_bytes() -> int:
    """Peak RSS of this process (ru_maxrss is KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class FanOut:
    """Sends every ``log`` call to several sinks."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = list(sinks)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class JsonlSink:
    """Rank 0's ``{run}/log.jsonl``: appended in place locally; rewritten whole on object stores (no append).

    Idempotent per step: a resumed run (or a restarted worker group) continues after its checkpoint's
    step ``start_step``, so rows past it left by the interrupted attempt are dropped first and every step
    appears once.
    """

    def __init__(self, url: str, start_step: int = 0):
        self.url = url
        self._local = storage.local_path(url)
        self._lines: list[str] = []
        if storage.exists(url):
            earlier = storage.read_text(url).splitlines()
            self._lines = [line for line in earlier if line.strip() and _step_of(line) <= start_step]
            if len(self._lines) != len(earlier):
                storage.write_text(url, "".join(line + "\n" for line in self._lines))
        if self._local:
            os.makedirs(os.path.dirname(self._local), exist_ok=True)
            self._lines = []  # appended in place from here on

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in metrics.items() if k != _STEP_TIME_KEY})
        line = json.dumps(row, sort_keys=True, default=float)
        if self._local:
            with open(self._local, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        else:
            self._lines.append(line)
            storage.write_text(self.url, "\n".join(self._lines) + "\n")

    def close(self) -> None:
        pass


class PrometheusSink:
    """One HTTP exporter per rank on ``port + local_rank`` (port 0: a free port); ``.target`` is host:port."""

    def __init__(self, run: str, world_rank: int, host: str = "127.0.0.1", port: int = 0,
                 local_rank: int | None = None):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        labels = ("run", "world_rank")
        self._labels = {"run": run, "world_rank": str(world_rank)}
        self._gauges = {k: prom.Gauge(n, h, labels, registry=self.registry) for k, (n, h) in _GAUGES.items()}
        self._counters = {k: prom.Counter(n.removesuffix("_total"), h, labels, registry=self.registry)
                          for k, (n, h) in _COUNTERS.items()}
        self._loss = {p: prom.Gauge(n, f"{p.rstrip('/')} loss terms", (*labels, "term"), registry=self.registry)
                      for p, n in _LOSS_PREFIXES.items()}
        self._totals = {k: prom.Counter(n.removesuffix("_total"), h, labels, registry=self.registry)
                        for k, (n, h) in _TOTALS.items()}
        self._seen_totals: dict[str, float] = {}
        self._step_time = prom.Histogram("mzsane_perf_step_time_seconds", "wall seconds per optimizer step", labels,
                                         buckets=_STEP_BUCKETS, registry=self.registry)
        offset = world_rank if local_rank is None else local_rank
        self._server, self._thread = prom.start_http_server(port + offset if port else 0, addr=host,
                                                            registry=self.registry)
        self.port = int(self._server.server_port)
        self.target = f"{host}:{self.port}"
        self._lock = threading.Lock()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with self._lock:
            self._gauges["train/step"].labels(**self._labels).set(step)
            for key, value in metrics.items():
                if key in self._gauges:
                    self._gauges[key].labels(**self._labels).set(float(value))
                elif key in self._counters:
                    self._counters[key].labels(**self._labels).inc(max(float(value), 0.0))
                elif key in self._totals:
                    delta = float(value) - self._seen_totals.get(key, 0.0)
                    self._totals[key].labels(**self._labels).inc(max(delta, 0.0))
                    self._seen_totals[key] = max(float(value), self._seen_totals.get(key, 0.0))
                elif key == _STEP_TIME_KEY:
                    for seconds in value:
                        self._step_time.labels(**self._labels).observe(float(seconds))
                else:
                    for prefix, family in self._loss.items():
                        name = key[len(prefix):]
                        if key.startswith(prefix) and (name.startswith("loss") or name == "rsq"):
                            family.labels(term=name, **self._labels).set(float(value))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


METRICS_HOST_ENV = "MZSANE_METRICS_HOST"
_ALL_INTERFACES = ("0.0.0.0", "::", "")


def bind_host(host: str, node: str = "127.0.0.1") -> str:
    """The address a rank's exporter listens on for ``metrics.host`` (see the module docstring)."""
    override = os.environ.get(METRICS_HOST_ENV, "").strip()
    if override:
        return node if override == "node" else override
    if host == "node":
        return node
    if host in _ALL_INTERFACES and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "127.0.0.1"
    return host


def make_sink(cfg_metrics: Any, run: str, run_url: str, world_rank: int, local_rank: int | None = None,
              node: str = "127.0.0.1", start_step: int = 0) -> tuple[FanOut, str]:
    """The sinks of one rank and its scrape target ('' when Prometheus export is disabled)."""
    sinks: list[MetricSink] = []
    target = ""
    if cfg_metrics.enabled:
        host = bind_host(cfg_metrics.host, node)
        prom_sink = PrometheusSink(run, world_rank, host, cfg_metrics.port, local_rank)
        sinks.append(prom_sink)
        target = prom_sink.target
    if world_rank == 0:
        sinks.append(JsonlSink(storage.join(run_url, "log.jsonl"), start_step))
    return FanOut(sinks), target


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", -1))
    except (ValueError, AttributeError):
        return float("inf")  # a torn last line of a killed run: dropped with the steps being redone


def write_targets(run_url: str, targets: list[str]) -> None:
    """``{run}/metrics_targets.json`` in Prometheus file_sd format (one entry per rank)."""
    entries = [{"targets": [t], "labels": {}} for t in targets if t]  # run/world_rank come from the exporter
    storage.write_json(storage.join(run_url, "metrics_targets.json"), entries)
