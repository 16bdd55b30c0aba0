"""``mzsane bench scale``: what happens to shards building and training as the zoo grows from 10 to 1,000 models.

Per zoo size N (synthetic zoos, ``zoo/synthetic.py``: a few initialised bases + per-model perturbations,
one checkpoint per model, written as two real zoos of N/2 models): the shards build, local and to S3
(SeaweedFS on loopback), in a child process whose peak RSS is read from ``wait4`` (seconds per model;
the RSS must not grow with N); once, one process building both zoos against two processes building one
zoo each (does a process pool use the 2 cores better); then training over the whole selection with 2 Ray
Train workers on a two-node loopback cluster (``loopback/ray_cluster.py``), ``default`` preset: peak RSS of
every worker (``VmHWM`` of the pids the workers announce), start-up to the first step (and the manifest
read + selection on its own), the data-wait share of step time and the bytes each worker reads per
epoch. Finally a synthetic 10^6-row manifest (no shards; ``bench/bigmanifest.py``): load and select a
sub-zoo, with the Parquet model index and, for comparison, the old all-JSON manifest; and a projection to
1,000 / 10,000 models and to the ``paper`` preset on a GPU node, with its assumptions in the JSON.

Full run: ResNet-18 (CIFAR stem), N in {10, 100, 1000} by default (``--sizes``), the zoo stored in float16
(``--zoo-dtype``: 22 MB a model instead of 45; shards are float32 either way, 42 MB a model): the disk holds the
zoo and the local shards of the largest N at once, ~64 GB at N = 1,000. Before each size the free space is
compared with what that size will write (from the bytes per model measured so far): too little is a one-line
error naming both figures, after the smaller sizes' figures are saved, not an ENOSPC an hour in.
``--quick``: ``resnet_mini`` at N in {10, 100}, a few steps: a smoke test of the whole path in ~1-2 min.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.bench import scale_figure
from mzsane.bench.bigmanifest import big_manifest
from mzsane.errors import MzsaneError

GPU_PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, the projection's reference GPU
ASSUMED_MFU = 0.35


# --------------------------------------------------------------------------------- child processes


def _child(args: dict) -> dict:
    """Runs in a child process (peak RSS of its own): one shards build."""
    from mzsane.shards import writer

    cfg = config_mod.Config()
    t0 = time.perf_counter()
    m = writer.build_shards(args["zoos"], args["out"], cfg.tokens, cfg.shards, progress=False)
    return {"build_s": time.perf_counter() - t0, "rows": sum(int(z["num_rows"]) for z in m.zoos.values()),
            "bytes": sum(int(f["num_bytes"]) for f in m.files)}


def _spawn(args: dict) -> subprocess.Popen:
    code = "import json,sys; from mzsane.bench import scale; print(json.dumps(scale._child(json.loads(sys.argv[1]))))"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _reap(proc: subprocess.Popen) -> dict:
    """Wait for a child and return its JSON result with its own peak RSS (``wait4``: not the max of all
    children, as ``RUSAGE_CHILDREN`` would be)."""
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"shards build child failed ({proc.returncode}): {err[-1500:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_bytes"] = int(usage.ru_maxrss) * 1024
    return result


def build(zoos: list[str], out: str, num_models: int) -> dict:
    storage.remove(out, recursive=True) if storage.exists(out) else None
    t0 = time.perf_counter()
    r = _reap(_spawn({"zoos": zoos, "out": out}))
    wall = time.perf_counter() - t0
    return {"models": num_models, "wall_s": round(wall, 2), "s_per_model": round(wall / num_models, 4),
            "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1), "bytes_per_model": r["bytes"] // num_models,
            "rows": r["rows"]}


def parallel_build(zoos: list[str], scratch: str, num_models: int) -> dict:
    """One process building both zoos vs one process per zoo at the same time (separate datasets)."""
    seq = build(zoos, os.path.join(scratch, "seq"), num_models)
    t0 = time.perf_counter()
    procs = [_spawn({"zoos": [z], "out": os.path.join(scratch, f"par{i}")}) for i, z in enumerate(zoos)]
    results = [_reap(p) for p in procs]
    par_wall = time.perf_counter() - t0
    for path in ["seq", *(f"par{i}" for i in range(len(zoos)))]:
        shutil.rmtree(os.path.join(scratch, path), ignore_errors=True)
    return {"models": num_models, "one_process_s": seq["wall_s"], "processes": len(zoos),
            "process_pool_s": round(par_wall, 2), "speedup": round(seq["wall_s"] / par_wall, 2),
            "process_pool_peak_rss_mb_each": [round(r["peak_rss_bytes"] / 2**20, 1) for r in results]}


# ------------------------------------------------------------------------------------------ training


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _WorkerMemory(threading.Thread):
    """Polls the peak RSS (VmHWM) of the training workers the run announces in ``{run}/workers``."""

    def __init__(self, run_url: str):
        super().__init__(daemon=True)
        self.run_url, self.stop_event, self.peak = run_url, threading.Event(), {}

    def run(self) -> None:
        pids: dict[int, int] = {}
        while not self.stop_event.wait(0.25):
            folder = storage.join(self.run_url, "workers")
            if len(pids) < 2 and storage.exists(folder):
                for name in storage.listdir(folder):
                    try:
                        info = storage.read_json(storage.join(folder, name))
                    except Exception:  # being written
                        continue
                    pids[int(info["world_rank"])] = int(info["pid"])
            for rank, pid in pids.items():
                self.peak[rank] = max(self.peak.get(rank, 0), _vm_hwm(pid))


def train_figures(root: str, shards_url: str, address: str, num_models: int, steps: int) -> dict:
    from mzsane.shards.manifest import read_manifest
    from mzsane.train import launch
    from mzsane.train.data import open_selection

    cfg = config_mod.load()
    cfg.storage.root, cfg.data.shards_url = root, shards_url
    cfg.cluster.address, cfg.cluster.num_workers = address, 2
    cfg.metrics.enabled = False
    cfg.train.num_steps, cfg.train.log_every_n_steps = steps, 1
    cfg.train.eval_every_n_steps, cfg.train.checkpoint_every_n_steps = -1, -1
    cfg.run_name = f"scale-{num_models}-{int(time.time())}"
    t0 = time.perf_counter()
    manifest = read_manifest(shards_url)
    _, _, train, _ = open_selection(cfg, 2)
    select_s = time.perf_counter() - t0
    run_url = storage.join(root, "runs", cfg.run_name)
    watcher = _WorkerMemory(run_url)
    watcher.start()
    t_launch = time.time()
    try:
        launch.train(cfg, address=address)
    finally:
        watcher.stop_event.set()
        watcher.join(timeout=5)
    # workers announce themselves after building model and data streams (Ray start-up + set-up before that)
    announced = storage.read_json(storage.join(run_url, "workers", "rank_0.json"))["time"]
    rows = [json.loads(x) for x in storage.read_text(storage.join(run_url, "log.jsonl")).splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r]
    steady = rows[1:] or rows
    last = rows[-1]
    per_rank_epoch = train.num_rows // 2
    read_rows = max(int(last.get("data/rows", 0)), 1)
    bytes_epoch = int(last.get("data/read_bytes", 0)) * per_rank_epoch // read_rows
    train_bytes = sum(int(f["num_bytes"]) for f in manifest.files if f["split"] == "train")
    row_bytes = max(int(z["num_tokens"]) for z in manifest.zoos.values()) * int(manifest.tokensize) * 4
    wait = sum(r["perf/data_wait_fraction"] for r in steady) / len(steady)
    return {
        "models": num_models, "train_rows": train.num_rows, "steps": steps,
        "peak_rss_mb_per_worker": {str(k): round(v / 2**20, 1) for k, v in sorted(watcher.peak.items())},
        "manifest_and_selection_s": round(select_s, 3),
        "start_to_workers_ready_s": round(announced - t_launch, 2),
        "start_to_first_step_s": round(rows[0]["time"] - t_launch, 2) if rows else None,
        # what the data path adds after the workers are up: the first step's windows (shuffle_initial) and step
        "workers_ready_to_first_step_s": round(rows[0]["time"] - announced, 2) if rows else None,
        "data_wait_fraction_steady": round(wait, 4),
        "data_wait_fraction_first_step": round(rows[0]["perf/data_wait_fraction"], 4) if rows else None,
        "tokens_per_s_rank0": round(sum(r["perf/tokens_per_s"] for r in steady) / len(steady), 1),
        "bytes_read_per_worker_per_epoch": bytes_epoch,
        "train_bytes_over_workers": train_bytes // 2,
        "rows_read_rank0": read_rows, "rows_per_worker_per_epoch": per_rank_epoch,
        "row_mb": round(row_bytes / 2**20, 1),
        "whole_row_buffer_mb_before": round(64 * row_bytes / 2**20, 1),  # the old 64-row buffer, per rank
    }


# ------------------------------------------------------------------------------------------ projection


def paper_gpu_projection(bytes_per_model: int, windows_per_row: int) -> dict:
    """tokens/s, MFU and hours per epoch of the ``paper`` preset on one GPU, from FLOPs and stated assumptions."""
    cfg = config_mod.load(presets.paper())
    m, d, layers = cfg.model, cfg.model.d_model, 2 * cfg.model.num_layers  # encoder + decoder
    w, b, tokensize = cfg.data.window_size, cfg.train.batch_size, cfg.tokens.tokensize
    # weights that multiply (position tables are lookups: memory, not FLOPs)
    params = layers * 12 * d * d + 2 * tokensize * d + 2 * d * m.latent_dim
    # per window token: two views, forward + backward = 3x forward, forward = 2 FLOPs per weight + attention
    flops_per_token = 2 * (6 * params + 12 * layers * w * d)
    tokens_per_s = ASSUMED_MFU * GPU_PEAK_BF16_FLOPS / flops_per_token
    windows_per_s = tokens_per_s / w
    num_tokens = 43_924  # ResNet-18 at tokensize 288
    k = max(1, min(windows_per_row, -(-num_tokens // w)))
    out = {"assumptions": {"gpu": "H100 SXM, 989 TFLOP/s dense bf16", "mfu": ASSUMED_MFU,
                           "matmul_params_estimate": int(params), "window": w, "batch_per_gpu": b,
                           "flops_per_window_token": int(flops_per_token),
                           "epoch": f"every selected checkpoint once, {k} windows each (data.windows_per_row)",
                           "coverage_epoch": "every token of every model once (43,924 tokens per ResNet-18)"},
           "tokens_per_s": round(tokens_per_s), "steps_per_s": round(windows_per_s / b, 2),
           "shard_read_mb_s_needed": round(windows_per_s / k * bytes_per_model / 2**20, 1)}
    for n in (1_000, 10_000):
        out[f"hours_per_epoch_{n}"] = round(n * k * w / tokens_per_s / 3600, 3)
        out[f"hours_per_coverage_epoch_{n}"] = round(n * num_tokens / tokens_per_s / 3600, 2)
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return my - b * mx, b


def projection(result: dict) -> dict:
    builds = result["build_local"]
    trains = result["train"]
    per_model = builds[-1]["bytes_per_model"]
    s_per_model = builds[-1]["s_per_model"]
    out: dict[str, Any] = {}
    rss = [max(t["peak_rss_mb_per_worker"].values()) for t in trains]
    a, slope = _fit([t["models"] for t in trains], rss)
    sel_a, sel_b = _fit([t["models"] for t in trains], [t["manifest_and_selection_s"] for t in trains])
    top_sel = max(t["manifest_and_selection_s"] for t in trains)
    top_rss = max(rss)
    for n in (1_000, 10_000):
        out[str(n)] = {"shard_gb": round(n * per_model / 1e9, 1), "zoo_gb": round(n * result["zoo_bytes_per_model"]
                                                                                    / 1e9, 1),
                       # 3 significant figures: a small fast zoo (--quick) is not "0 h"
                       "build_h_one_process": float(f"{n * s_per_model / 3600:.3g}"),
                       "train_rss_mb_per_worker_linear_fit": round(max(a + slope * n, top_rss), 1),
                       "manifest_and_selection_s_linear_fit": round(max(sel_a + sel_b * n, top_sel), 2)}
    out["fit"] = {"rss_mb": [round(a, 1), round(slope, 4)], "select_s": [round(sel_a, 4), round(sel_b, 6)],
                  "note": "y = a + b * models from the measured sizes, never below the largest measured value"}
    cfg = config_mod.Config()
    out["paper_gpu"] = paper_gpu_projection(per_model, cfg.data.windows_per_row)
    return out


# ---------------------------------------------------------------------------------------------- run


def run(args: Any) -> dict[str, Any]:
    from mzsane.loopback.ray_cluster import LoopbackCluster
    from mzsane.loopback.seaweedfs import SeaweedFS
    from mzsane.zoo.synthetic import perturbed_zoo

    quick = bool(getattr(args, "quick", False))
    sizes = [int(s) for s in (getattr(args, "sizes", "") or ("10,100" if quick else "10,100,1000")).split(",")]
    arch = getattr(args, "arch", "") or ("resnet_mini" if quick else "resnet18")
    s3_max = int(getattr(args, "s3_max_models", 0) or (min(sizes) if quick else 100))
    steps = int(getattr(args, "steps", 0) or (3 if quick else 60))
    parallel_at = min(sizes) if quick else (100 if 100 in sizes else max(sizes))
    zoo_dtype = getattr(args, "zoo_dtype", "") or "float16"
    cfg = config_mod.Config()
    result: dict[str, Any] = {"architecture": arch, "sizes": sizes, "cpus": os.cpu_count(), "steps": steps,
                              "zoo_dtype": zoo_dtype,
                              "preset": "default", "windows_per_row": cfg.data.windows_per_row,
                              "shuffle_buffer_windows": cfg.data.shuffle_buffer,
                              "buffer_mb_windows": round(cfg.data.shuffle_buffer * 2 * cfg.data.window_size
                                                         * cfg.tokens.tokensize * 4 / 2**20, 1),
                              "zoo": [], "build_local": [],
                              "build_s3": [], "train": []}
    scratch = tempfile.mkdtemp(prefix="mzsane-bench-scale-")
    saved_env = dict(os.environ)
    server = SeaweedFS(os.path.join(scratch, "s3"), bucket="scale")
    cluster = LoopbackCluster()
    try:
        server.start()
        os.environ.update(server.env)
        cluster.start()
        os.environ.update(cluster.env)
        zoos = [os.path.join(scratch, "zoos", half) for half in ("synth_a", "synth_b")]
        for n in sizes:
            _check_disk(scratch, result, n, copies=1 + (n <= s3_max) + 2 * (n == parallel_at))
            halves = [n // 2, n - n // 2]
            made = [perturbed_zoo(os.path.basename(z), arch, k, seed=i, dtype=zoo_dtype).write(z)
                    for i, (z, k) in enumerate(zip(zoos, halves))]
            zoo_bytes = sum(storage.du(z) for z in zoos)
            result["zoo"].append({"models": n, "write_s": round(sum(m["write_s"] for m in made), 2),
                                  "bytes_per_model": zoo_bytes // n})
            result["zoo_bytes_per_model"] = zoo_bytes // n
            local = os.path.join(scratch, "shards", f"n{n}")
            result["build_local"].append(build(zoos, local, n))
            if n <= s3_max:
                s3 = server.url(f"shards/n{n}")
                result["build_s3"].append(build(zoos, s3, n))
                storage.remove(s3, recursive=True)
            if n == parallel_at:
                result["parallel_build"] = parallel_build(zoos, os.path.join(scratch, "par"), n)
            result["train"].append(train_figures(os.path.join(scratch, "root"), local, cluster.address, n, steps))
            shutil.rmtree(local, ignore_errors=True)
            shutil.rmtree(os.path.join(scratch, "root", "runs"), ignore_errors=True)
            _save_partial(getattr(args, "out", ""), result)
        result["manifest_1e6"] = big_manifest(10_000 if quick else 1_000_000, scratch)  # bench/bigmanifest.py
        result["projection"] = projection(result)
        result["checks"] = _checks(result)
        out = getattr(args, "out", "")
        if out:  # bench/scale_figure.py: memory, start-up and data wait vs N, beside the JSON
            result["figure"] = scale_figure.figure(result, os.path.splitext(out)[0] + ".png")
        _save_partial(out, result)
    finally:
        cluster.stop()
        server.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _check_disk(scratch: str, result: dict, n: int, copies: int) -> None:
    """Refuse size ``n`` when the scratch disk cannot hold what it writes: the zoo's growth to ``n`` models and
    ``copies`` shard sets of ``n`` models (local, S3, the parallel build's two). Known only from a measured size:
    the first size is not checked."""
    if not result["build_local"]:
        return
    zoo_models = result["zoo"][-1]["models"]
    need = (max(0, n - zoo_models) * result["zoo_bytes_per_model"]
            + copies * n * result["build_local"][-1]["bytes_per_model"])
    free = shutil.disk_usage(scratch).free
    if need > 0.95 * free:
        half = "--zoo-dtype float16, " if result.get("zoo_dtype") == "float32" else ""
        raise MzsaneError(f"bench scale at {n} models needs ~{need / 1e9:.0f} GB of scratch disk, "
                          f"{free / 1e9:.0f} GB is free under {os.path.dirname(scratch)}: pass smaller --sizes, "
                          f"{half}or point TMPDIR at a larger disk")


def _save_partial(path: str, result: dict) -> None:
    """The figures so far (a long run that is stopped keeps what it measured)."""
    if path:
        storage.write_json(path, result)


def _checks(result: dict) -> dict:
    """The issue's goals, stated against the measured figures (True/False, never asserted here)."""
    b, t = result["build_local"], result["train"]
    rss = [max(x["peak_rss_mb_per_worker"].values()) for x in t]
    return {"build_rss_ratio_largest_vs_smallest": round(b[-1]["peak_rss_mb"] / b[0]["peak_rss_mb"], 3),
            "train_rss_ratio_largest_vs_smallest": round(rss[-1] / rss[0], 3),
            "train_rss_goal_1_1x": rss[-1] <= 1.1 * rss[0], "train_rss_under_2gb": max(rss) < 2048,
            "data_wait_under_1pct": all(x["data_wait_fraction_steady"] < 0.01 for x in t),
            "first_step_under_10s_largest": (t[-1]["start_to_first_step_s"] or 1e9) < 10,
            "bytes_per_worker_epoch_le_share": all(x["bytes_read_per_worker_per_epoch"]
                                                   <= 1.1 * x["train_bytes_over_workers"] + 1 for x in t)}
