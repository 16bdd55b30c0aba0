"""``mzsane bench train``: training throughput, data wait, checkpoint cost and the shard-reading path.

Figures (JSON): whole training steps (``trainstep.py``): real (non-padding) and padded model tokens/s and
the step's FLOP fraction of matmul peak, for the demo's CNN config in its layouts (2 Ray Train ranks x 1
thread, 1 rank x 2 threads, in-process batch 16, and the old padded windows) and for a ResNet zoo config,
run interleaved; packing short models into windows vs trimming windows; tokens/s per worker with 1 and 2
Ray Train workers (``small`` preset, local Ray on loopback, local shards); the data-wait fraction of step
time when the shards live in S3 (a SeaweedFS server started here on 127.0.0.1 and stopped by PID),
in-process and under 2 Ray Train workers;
checkpoint save (write + upload to S3) and restore (download + safe load) seconds; and reading the
same shard files with Ray Data's ``read_parquet`` against plain pyarrow row-group reads (the reason
``train/data.py`` reads row groups itself).

The zoos are synthetic (cnn_s or resnet_mini networks drawn around shared bases): throughput and I/O do not depend on
what the weights learned, and building a real zoo would dominate the benchmark.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from mzsane import config as config_mod
from mzsane import presets, storage
from mzsane.errors import ConfigError

NUM_MODELS = 24
EPOCHS = (0, 1, 2, 3)


def synthetic_shards(root: str, tokensize: int, num_models: int = NUM_MODELS) -> str:
    """A cnn_s zoo (one shared init + one direction per model, ``zoo/synthetic.py``) sharded at
    ``{root}/shards/default``."""
    from mzsane.zoo.synthetic import Directions, SyntheticZoo

    zoo_url = storage.join(root, "zoos", "mnist_cnn_s")
    SyntheticZoo("mnist_cnn_s", "cnn_s", num_models, EPOCHS,
                 Directions(num_directions=1, seed=0, coefficient_seed=1)).write(zoo_url)
    return _shard(zoo_url, storage.join(root, "shards", "default"), tokensize)


def _shard(zoo_url: str, out: str, tokensize: int) -> str:
    """Shards of one zoo at the default settings, ``tokensize`` wide, 8 rows a row group."""
    from mzsane.shards import writer

    cfg = config_mod.Config()
    cfg.tokens.tokensize = tokensize
    cfg.shards.rows_per_row_group = 8
    writer.build_shards([zoo_url], out, cfg.tokens, cfg.shards, progress=False)
    return out


def _cfg(root: str, steps: int, workers: int) -> config_mod.Config:
    cfg = presets.small()
    cfg.storage.root = root
    cfg.train.num_steps = steps
    cfg.train.log_every_n_steps = max(steps // 4, 1)
    cfg.train.eval_every_n_steps = -1
    cfg.train.checkpoint_every_n_steps = -1  # only the final one
    cfg.metrics.enabled = False
    cfg.cluster.num_workers = workers
    return cfg


def _perf(run_url: str) -> dict[str, float]:
    """Means over log rows after the first (warm-up) one."""
    rows = [json.loads(x) for x in storage.read_text(storage.join(run_url, "log.jsonl")).splitlines()]
    rows = [r for r in rows if "perf/tokens_per_s" in r][1:] or rows[-1:]
    keys = ("perf/tokens_per_s", "perf/data_wait_fraction")
    return {k.split("/")[1]: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}


def ray_throughput(root: str, steps: int) -> dict[str, Any]:
    from mzsane.train import launch

    out = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        run_url = launch.train(_cfg(root, steps, workers))
        out[f"workers_{workers}"] = {**_perf(run_url), "wall_s": round(time.perf_counter() - t0, 1)}
    return out


def s3_data_wait(s3_root: str, steps: int, workers: int = 0) -> dict[str, Any]:
    """Data-wait share of step time with the shards in S3: in-process (``workers=0``) or under Ray Train."""
    from mzsane.train import launch

    run_url = launch.train(_cfg(s3_root, steps, max(workers, 1)), no_ray=workers == 0)
    return _perf(run_url)


def checkpoint_seconds(s3_root: str) -> dict[str, float]:
    from mzsane.model.sane import SANE
    from mzsane.train import checkpoint as ckpt
    from mzsane.train.loop import make_optimizer, make_scheduler

    cfg = _cfg(s3_root, 10, 1)
    cfg.model.max_positions = [4096, 64, 512]
    model = SANE(cfg.model, cfg.tokens.tokensize, cfg.model.max_positions)
    opt = make_optimizer(model, cfg.train)
    sched = make_scheduler(opt, cfg.train)
    model(torch.randn(2, 8, cfg.tokens.tokensize), torch.zeros(2, 8, 3, dtype=torch.long))[0].sum().backward()
    opt.step()
    state = {"step": 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "ranks": []}
    url = storage.join(s3_root, "runs", "bench-ckpt", ckpt.checkpoint_name(1))
    scratch = tempfile.mkdtemp(prefix="mzsane-bench-")
    try:
        t0 = time.perf_counter()
        ckpt.save(os.path.join(scratch, "save"), model, state, cfg)
        storage.upload_dir(os.path.join(scratch, "save"), url)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        weights, _, _ = ckpt.load(ckpt.fetch(url, os.path.join(scratch, "load")), cfg)
        model.load_state_dict(weights)
        restore_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum(p.numel() for p in model.parameters())
    return {"save_s": round(save_s, 3), "restore_s": round(restore_s, 3), "model_params": size}


def read_paths(shards_url: str, repeats: int, node_ip: str) -> dict[str, Any]:
    """Rows/s and MiB/s reading every shard row: pyarrow row groups (ShardReader) vs Ray Data read_parquet (on a
    local 2-CPU Ray at the loopback ``node_ip``)."""
    import ray

    from mzsane.shards.manifest import read_manifest
    from mzsane.shards.reader import ShardReader
    from mzsane.shards.select import select
    from mzsane.train.launch import ray_connection

    manifest = read_manifest(shards_url)
    files = [storage.join(shards_url, f["path"]) for f in manifest.files]
    nbytes = sum(storage.size(f) for f in files)
    out: dict[str, Any] = {"files": len(files), "mib": round(nbytes / 2**20, 2)}
    selection = [select(manifest, split=s) for s in ("train", "val", "test")]
    t0 = time.perf_counter()
    rows = 0
    for _ in range(repeats):
        for sel in selection:
            rows += sum(1 for _ in ShardReader(shards_url, sel, manifest).iter_samples(shuffle_buffer=1))
    dt = time.perf_counter() - t0
    out["pyarrow_row_groups"] = {"rows_per_s": round(rows / dt, 1),
                                 "mib_per_s": round(repeats * nbytes / 2**20 / dt, 1)}
    fs, _ = storage.pyarrow_fs(shards_url)
    with ray_connection("", node_ip, num_cpus=2):
        paths = [storage.pyarrow_fs(f)[1] for f in files]
        timings = []
        for _ in range(repeats + 1):  # the first pass is cold (Ray Data start-up); report both
            t0 = time.perf_counter()
            ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["tokens", "model_id"])
            count = sum(len(b["model_id"]) for b in ds.iter_batches(batch_size=64, batch_format="pyarrow"))
            timings.append((time.perf_counter() - t0, count))
        cold, warm = timings[0], timings[1:]
        warm_s = sum(t for t, _ in warm)
        out["ray_data_read_parquet"] = {"cold_rows_per_s": round(cold[1] / cold[0], 1),
                                        "rows_per_s": round(sum(c for _, c in warm) / warm_s, 1),
                                        "mib_per_s": round(len(warm) * nbytes / 2**20 / warm_s, 1)}
    out["pyarrow_speedup"] = round(out["pyarrow_row_groups"]["rows_per_s"]
                                   / out["ray_data_read_parquet"]["rows_per_s"], 2)
    return out


def resnet_shards(root: str, tokensize: int, num_models: int, arch: str = "resnet_mini") -> str:
    """A synthetic zoo of ``arch`` (epochs 2 and 3, as the demo trains the tail) sharded at ``{root}/shards/{arch}``."""
    from mzsane.zoo.synthetic import perturbed_zoo

    zoo_url = storage.join(root, "zoos", f"synth_{arch}")
    perturbed_zoo(f"synth_{arch}", arch, num_models, epochs=(2, 3)).write(zoo_url)
    return _shard(zoo_url, storage.join(root, "shards", arch), tokensize)


def demo_steps(scratch: str, steps: int, repeats: int, only: str = "") -> dict[str, Any]:
    """The demo's CNN config (default preset, the demo's settings) in each layout, and the default and small
    presets on a ResNet zoo, all interleaved; the ``_fp32`` cases pin ``train.precision=fp32`` where the others
    take the config's ``auto`` (bf16 on a CPU with native bf16); plus packing vs trimming at the demo's sizes."""
    from mzsane.bench import trainstep

    demo = presets.demo()
    cnn = synthetic_shards(scratch, demo.tokens.tokensize)
    resnet = resnet_shards(scratch, demo.tokens.tokensize, 8)
    padded, fp32 = copy.deepcopy(demo), copy.deepcopy(demo)
    padded.data.pad_windows = True
    padded.train.precision = fp32.train.precision = "fp32"  # the step before issue 29, and without bf16
    small, small_fp32 = presets.small(), presets.small()
    small_fp32.train.precision = "fp32"
    case = trainstep.case_config
    cases = {
        "cnn_ray_2x1_padded": (case(padded, scratch, cnn, steps, 2, 1, 16), 2, 1),  # before issue 29
        "cnn_ray_2x1_fp32": (case(fp32, scratch, cnn, steps, 2, 1, 16), 2, 1),
        "cnn_ray_2x1": (case(demo, scratch, cnn, steps, 2, 1, 16), 2, 1),  # the demo: precision auto
        "cnn_ray_1x2": (case(demo, scratch, cnn, steps, 1, 2, 16), 1, 2),
        "cnn_no_ray_b16": (case(demo, scratch, cnn, steps, 0, 2, 16), 0, 2),
        # a local sweep point (jobs/local: 1 rank x 1 CPU, two points side by side on 2 cores)
        "cnn_ray_1x1": (case(demo, scratch, cnn, steps, 1, 1, 16), 1, 1),
        "cnn_ray_1x1_fp32": (case(fp32, scratch, cnn, steps, 1, 1, 16), 1, 1),
        "resnet_default_ray_1x2": (case(demo, scratch, resnet, steps, 1, 2, 16), 1, 2),
        "resnet_small_ray_1x2": (case(small, scratch, resnet, max(steps // 4, 12), 1, 2, 16), 1, 2),
        "resnet_small_ray_1x2_fp32": (case(small_fp32, scratch, resnet, max(steps // 4, 12), 1, 2, 16), 1, 2),
    }
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(cases))
        if unknown:
            raise ConfigError(f"bench train --cases: unknown case(s) {', '.join(unknown)}; the cases are "
                              f"{', '.join(cases)}")
        return trainstep.measure({n: cases[n] for n in names}, repeats)
    out = trainstep.measure(cases, repeats)
    out["packing"] = trainstep.packing(demo, model_tokens=48, window=64, num_windows=32)
    return out


def preset_steps(cfg: config_mod.Config, preset: str, arch: str, steps: int, repeats: int) -> dict[str, Any]:
    """One preset's whole steps in-process (the GPU if there is one, bf16 autocast there): tokens/s and MFU.
    ``paper`` trains the paper's backbone at d_model 1024, 4+4 layers, latent 128."""
    from mzsane.bench import trainstep

    cfg = copy.deepcopy(cfg)
    if preset == "paper":
        cfg.model.d_model, cfg.model.num_heads, cfg.model.num_layers, cfg.model.latent_dim = 1024, 16, 4, 128
    scratch = tempfile.mkdtemp(prefix="mzsane-bench-train-")
    try:
        shards = (synthetic_shards(scratch, cfg.tokens.tokensize) if arch == "cnn_s"
                  else resnet_shards(scratch, cfg.tokens.tokensize, 8, arch))
        threads = torch.get_num_threads()
        cases = {preset: (trainstep.case_config(cfg, scratch, shards, steps, 0, threads, cfg.train.batch_size),
                          0, threads)}
        result = trainstep.measure(cases, repeats)[preset]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    c = cfg.model
    return {"preset": preset, "device": device, "arch": arch, "steps": steps,
            "precision": ("bf16 autocast" if torch.cuda.is_available() or trainstep.matmul_dtype(cfg) == torch.bfloat16
                          else "fp32"),
            "model": {"d_model": c.d_model, "num_heads": c.num_heads, "num_layers": c.num_layers,
                      "latent_dim": c.latent_dim, "window_size": cfg.data.window_size,
                      "batch_size": cfg.train.batch_size}, **result}


def run(args: Any) -> dict[str, Any]:
    from mzsane.loopback.seaweedfs import SeaweedFS

    quick = bool(getattr(args, "quick", False))
    preset = getattr(args, "preset", "default")
    step_count = int(getattr(args, "steps", 0) or 0)
    repeats = int(getattr(args, "repeats", 0) or 0) or (1 if quick else 2)
    if preset != "default" or args.config or args.overrides:  # one config's whole steps only
        return _save(args, preset_steps(args.cfg, preset, getattr(args, "arch", "") or "resnet_mini",
                                        step_count or (8 if quick else 40), repeats))
    steps = 12 if quick else 40
    cfg = presets.small()
    result: dict[str, Any] = {"preset": "small", "steps": steps, "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads()}
    scratch = tempfile.mkdtemp(prefix="mzsane-bench-train-")
    saved_env = dict(os.environ)
    server = SeaweedFS(os.path.join(scratch, "s3"), bucket="bench")
    try:
        result["demo_steps"] = demo_steps(os.path.join(scratch, "steps"), step_count or (40 if quick else 200),
                                          repeats, getattr(args, "cases", "") or "")
        if getattr(args, "steps_only", False):
            return _save(args, result)
        local_root = os.path.join(scratch, "local")
        synthetic_shards(local_root, cfg.tokens.tokensize)
        result["ray_train"] = ray_throughput(local_root, steps)
        server.start()
        os.environ.update(server.env)
        s3_root = server.url("train")
        s3_shards = synthetic_shards(s3_root, cfg.tokens.tokensize)
        result["s3_no_ray"] = s3_data_wait(s3_root, steps)
        result["s3_ray_2_workers"] = s3_data_wait(s3_root, steps, workers=2)
        result["checkpoint_s3"] = checkpoint_seconds(s3_root)
        result["read_paths_s3"] = read_paths(s3_shards, 1 if quick else 3, cfg.cluster.node_ip)
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved_env)
        shutil.rmtree(scratch, ignore_errors=True)
    return _save(args, result)


def _save(args: Any, result: dict[str, Any]) -> dict[str, Any]:
    """Also write the result to ``--out`` (e.g. docs/results/bench-train.json)."""
    out = getattr(args, "out", "")
    if out:
        storage.write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
