"""Whole training steps as ``mzsane bench train`` measures them: real and padded tokens/s, and MFU.

Why the whole step: ``bench model`` times forward + loss + backward on a fixed batch; a training step also
waits for the data stream, cuts and augments both views, all-reduces gradients (DDP), clips and steps the
optimizer. Each case here runs the real ``mzsane train`` (Ray Train workers, or in-process ``--no-ray``) on
a synthetic zoo and reads rank 0's ``log.jsonl``: the median and the sum of the step wall times of every log
interval (``perf/step_time_median_s``; the first interval, holding start-up and the shuffle buffer's first
fill, is left out; the median step is the median of the intervals' medians), and the
tokens each step handed the model (``perf/real_tokens``: the models' own tokens; ``perf/positions``: the
positions computed, padding included). Tokens count one view, as the reference's "model tokens per
second" does; FLOPs count both views (the loop forwards 2 x batch windows).

The FLOP fraction: analytic model FLOPs of the step (``SANE.train_flops_per_token`` at the step's mean
window length, x 2 views x positions) / median step time / peak. The peak on CPU is a square matmul
measured in this process at the case's total thread count (ranks x threads), in a short round before every
case, the best round kept (as ``bench model`` does, so a burst of load from another process does not
inflate the fraction); on a GPU it is the device's nominal dense bf16 peak. ``mfu`` counts the positions
computed, ``mfu_real`` only the models' tokens (the useful share).

``packing``: the other way to spend no compute on padding, several short models packed into one window with
a block-diagonal attention mask, timed against trimmed windows on the same real tokens (transformer stacks
forward + backward, the part packing changes).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Any

import torch

from mzsane import storage
from mzsane.config import Config

# nominal dense bf16 FLOP/s (vendor sheets); other GPUs use a measured bf16 matmul
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def load() -> list[float]:
    """The 1/5/15-minute load averages (``uptime``), recorded beside every figure: the machine is shared."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_flops(threads: int, seconds: float = 0.6, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for ``threads`` CPU threads multiplying ``dtype`` (the dtype the case's
    matmuls run in: bf16 under autocast), or the GPU's nominal bf16 peak."""
    from mzsane.bench.model import _matmul_round

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16.items():
            if key in name:
                return flops, f"nominal dense bf16 of {name}"
        device = torch.device("cuda")
        return max(_matmul_round(n, device, torch.bfloat16, seconds) for n in (4096, 8192)), f"bf16 matmul on {name}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = max(_matmul_round(n, torch.device("cpu"), dtype, seconds / 2) for n in (1024, 2048))
    finally:
        torch.set_num_threads(before)
    name = "bf16" if dtype == torch.bfloat16 else "fp32"
    return best, f"{name} square matmul, {threads} threads, measured"


def matmul_dtype(cfg: Config) -> torch.dtype:
    """The dtype a CPU case's matmuls run in (``train.precision`` on this CPU): its peak is that dtype's."""
    from mzsane.model.precision import autocast_dtype

    return autocast_dtype(cfg.train.precision, torch.device("cpu")) or torch.float32


def case_config(base: Config, root: str, shards_url: str, steps: int, workers: int, threads: int,
                global_batch: int) -> Config:
    """``base`` run for ``steps`` steps by ``workers`` ranks (0: in-process) of ``threads`` threads each, at the
    same global batch; no evaluation, no metrics server, only the final checkpoint."""
    cfg = copy.deepcopy(base)
    cfg.storage.root, cfg.data.shards_url = root, shards_url
    cfg.run_name = ""
    cfg.train.num_steps, cfg.train.num_epochs = steps, 0.0
    cfg.train.log_every_n_steps = max(min(10, steps // 3), 1)
    cfg.train.eval_every_n_steps = -1
    cfg.train.checkpoint_every_n_steps = -1
    cfg.train.compile = False  # compile time would dominate a short benchmark
    cfg.metrics.enabled = False
    cfg.cluster.num_workers = max(workers, 1)
    cfg.cluster.cpus_per_worker = threads
    cfg.train.batch_size = max(global_batch // max(workers, 1), 1)
    return cfg


def run_case(cfg: Config, workers: int, threads: int) -> str:
    """Train ``cfg`` (Ray Train with ``workers`` ranks, or in-process when 0); returns the run URL."""
    from mzsane.train import launch

    if workers:
        return launch.train(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return launch.train(cfg, no_ray=True)
    finally:
        torch.set_num_threads(before)


def figures(run_url: str, cfg: Config, world_size: int, peak: float) -> dict[str, Any]:
    """Median step, tokens per step and second (real and padded), and the FLOP fractions of one run."""
    from mzsane.model.sane import SANE

    rows = [json.loads(x) for x in storage.read_text(storage.join(run_url, "log.jsonl")).splitlines()]
    rows = [r for r in rows if "perf/step_time_median_s" in r]
    steady = rows[1:] or rows  # the first interval holds start-up and the shuffle buffer's first fill
    times = [r["perf/step_time_median_s"] for r in steady]  # one median per log interval
    steps = sum(int(r["train/steps"]) for r in steady)
    total_s = sum(r["perf/step_time_sum_s"] for r in steady)
    real = world_size * sum(r["perf/real_tokens"] for r in steady) / steps
    padded = world_size * sum(r["perf/positions"] for r in steady) / steps
    windows = world_size * cfg.train.batch_size
    window = padded / windows
    model = SANE(cfg.model, cfg.tokens.tokensize, [4096, 64, 512])  # embeddings: no matmul FLOPs
    flops_per_position = model.train_flops_per_token(round(window))
    median = statistics.median(times)
    return {
        "median_step_s": round(median, 4), "mean_step_s": round(total_s / steps, 4),
        "interval_median_range_s": [round(min(times), 4), round(max(times), 4)],
        "steps_timed": steps, "windows_per_step": windows, "window_positions": round(window, 1),
        "real_tokens_per_window": round(real / windows, 1),
        "real_tokens_per_s": round(real / median, 1), "padded_tokens_per_s": round(padded / median, 1),
        "model_gflop_per_step": round(2 * flops_per_position * padded / 1e9, 3),
        "achieved_gflops": round(2 * flops_per_position * padded / median / 1e9, 2),
        "achieved_real_gflops": round(2 * flops_per_position * real / median / 1e9, 2),
        "mfu": round(2 * flops_per_position * padded / median / peak, 3),
        "mfu_real": round(2 * flops_per_position * real / median / peak, 3),
        "data_wait_fraction": round(sum(r.get("perf/data_wait_s", 0.0) for r in steady) / max(total_s, 1e-9), 4),
        "final_train_loss": round(float(rows[-1].get("train/loss", float("nan"))), 4) if rows else None,
    }


def measure(cases: dict[str, tuple[Config, int, int]], repeats: int) -> dict[str, Any]:
    """Run every case ``repeats`` times interleaved (A, B, A, B, ...): ``cases[name] = (cfg, workers, threads)``.
    Each case's figures are from its run with the median ``real_tokens_per_s``; every run is listed with the
    load average it ran under."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    peaks: dict[tuple[str, int], float] = {}  # (dtype, total threads) -> best matmul FLOP/s of the measurement
    for _ in range(repeats):
        for name, (cfg, workers, threads) in cases.items():
            total = max(workers, 1) * threads
            dtype = matmul_dtype(cfg)
            peak, how = peak_flops(total, dtype=dtype)
            key = (str(dtype).replace("torch.", ""), total)
            peaks[key] = max(peaks.get(key, 0.0), peak)
            load_before = load()
            t0 = time.perf_counter()
            run_url = run_case(cfg, workers, threads)
            row = figures(run_url, cfg, max(workers, 1), peak)
            row.update({"load_avg": load_before, "wall_s": round(time.perf_counter() - t0, 1),
                        "threads_total": total, "matmul_dtype": key[0], "peak": how})
            runs[name].append(row)
    renormalize(runs, peaks)
    out: dict[str, Any] = {}
    for name, rows in runs.items():
        cfg, workers, threads = cases[name]
        ranked = sorted(rows, key=lambda r: r["real_tokens_per_s"])
        spread = [ranked[0]["real_tokens_per_s"], ranked[-1]["real_tokens_per_s"]]
        out[name] = {**ranked[len(ranked) // 2], "layout": f"{max(workers, 1)} rank(s) x {threads} thread(s)",
                     "ray": bool(workers), "pad_windows": cfg.data.pad_windows,
                     "real_tokens_per_s_range": spread, "runs": rows}
    return out


def renormalize(runs: dict[str, list[dict[str, Any]]], peaks: dict[tuple[str, int], float]) -> None:
    """Every fraction against the best peak per thread seen in the whole measurement, times the run's threads: a
    peak round that another process slowed down would otherwise inflate the fraction of the run after it (single
    rounds here ranged 27-200 GFLOP/s at load 5-25), and a thread count measured only under load would too."""
    per_thread = {}
    for (dtype, threads), flops in peaks.items():
        per_thread[dtype] = max(per_thread.get(dtype, 0.0), flops / threads)
    for rows in runs.values():
        for row in rows:
            best = per_thread[row["matmul_dtype"]] * row["threads_total"]
            row.update({"peak_gflops": round(best / 1e9, 1), "mfu": round(row["achieved_gflops"] * 1e9 / best, 3),
                        "mfu_real": round(row["achieved_real_gflops"] * 1e9 / best, 3)})


def _stack_seconds(blocks: torch.nn.ModuleList, x_BTH: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Wall time of one forward + backward through ``blocks`` (an encoder and a decoder stack's worth)."""
    x = x_BTH.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = x
    for block in blocks:
        y = block(y, mask)
    y.square().mean().backward()
    return time.perf_counter() - t0


def packing(cfg: Config, model_tokens: int, window: int, num_windows: int, rounds: int = 40) -> dict[str, Any]:
    """Trimmed windows (``num_windows`` x ``model_tokens``, no mask) vs the same tokens packed into windows of
    ``window`` positions with a block-diagonal mask (tokens of one model attend only to each other)."""
    from mzsane.model.sane import SANE

    model = SANE(cfg.model, cfg.tokens.tokensize, [4096, 64, 512]).train()
    blocks = torch.nn.ModuleList(list(model.encoder) + list(model.decoder))
    H, total = cfg.model.d_model, num_windows * model_tokens
    g = torch.Generator().manual_seed(0)
    trimmed_BTH = torch.randn(num_windows, model_tokens, H, generator=g)
    packed_windows = -(-total // window)
    packed_BTH = torch.randn(packed_windows, window, H, generator=g)
    model_of_BT = (torch.arange(packed_windows * window) // model_tokens).view(packed_windows, window)
    mask = (model_of_BT[:, :, None] == model_of_BT[:, None, :])[:, None]  # [B, 1, T, T]
    load_before = load()
    _stack_seconds(blocks, trimmed_BTH, None), _stack_seconds(blocks, packed_BTH, mask)  # warm-up
    pairs = [(_stack_seconds(blocks, trimmed_BTH, None), _stack_seconds(blocks, packed_BTH, mask))
             for _ in range(rounds)]  # interleaved, so load bursts hit both sides
    trimmed_s, packed_s = min(t for t, _ in pairs), min(p for _, p in pairs)
    ratios = sorted(p / t for t, p in pairs)
    return {"real_tokens": total, "model_tokens": model_tokens, "packed_window": window,
            "trimmed_windows": num_windows, "packed_windows": packed_windows, "rounds": rounds,
            "trimmed_tokens_per_s": round(total / trimmed_s, 1), "packed_tokens_per_s": round(total / packed_s, 1),
            "packed_over_trimmed_time_best": round(packed_s / trimmed_s, 3),
            "packed_over_trimmed_time_median_of_rounds": round(ratios[len(ratios) // 2], 3),
            "threads": torch.get_num_threads(), "load_avg": [load_before, load()]}
