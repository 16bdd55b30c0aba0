"""``mzsane bench model``: SANE forward+backward throughput and its matmul efficiency, as JSON.

Why a ratio and not just tokens/s: the machine is shared and its speed varies, so absolute figures are
noisy. Achieved FLOP/s (matmul FLOPs counted analytically: 6 x matmul weights x tokens + 12 x layers x
T x H x tokens for attention) is divided by the FLOP/s of a plain square matmul measured in the same
process, with the same thread count and dtype, in short rounds interleaved with the model's; both take
their best round, so a burst of load from another process penalises neither side alone (the median of the
per-round ratios is reported too). The square reference is the
fastest of n = 1024 and 2048 (the conservative choice: the BLAS plateau).

Each step is: both views of ``train.batch_size`` windows stacked into one batch of 2B windows (how the
training loop calls the model), forward, the full SANE loss (reconstruction + head + NT-Xent), backward.
The optimizer step is not included. ``paper`` runs only when a GPU is present (in bf16 autocast).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mzsane import presets
from mzsane.model.losses import sane_loss
from mzsane.model.sane import SANE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_round(n: int, device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of ``a @ b`` for square n x n matrices over about ``seconds``."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * n ** 3 * reps / elapsed


class _ModelCase:
    """One preset's model, a fixed batch of random windows, and a timed forward+backward."""

    def __init__(self, preset: str, device: torch.device, autocast: bool):
        cfg = presets.PRESETS[preset]()
        self.preset, self.cfg, self.device, self.autocast = preset, cfg, device, autocast
        W, D, B = cfg.data.window_size, cfg.tokens.tokensize, 2 * cfg.train.batch_size
        max_positions = cfg.model.max_positions or [max(4 * W, 64), 32, 512]
        self.model = SANE(cfg.model, D, max_positions).to(device).train()
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randn(B, W, D, generator=g).to(device)
        self.mask = torch.ones(B, W, D, dtype=torch.bool, device=device)
        pos = torch.stack([torch.arange(W).expand(B, W), torch.zeros(B, W, dtype=torch.long),
                           torch.arange(W).expand(B, W) % max_positions[2]], dim=-1)
        self.positions = pos.to(device)
        self.valid = torch.ones(B, W, dtype=torch.bool, device=device)
        self.batch, self.window = B, W
        self.flops_per_step = self.model.train_flops_per_token(W) * B * W

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            _, zp, recon = self.model(self.tokens, self.positions, self.valid)
            half = self.batch // 2
            terms = sane_loss(recon[:half], recon[half:], zp[:half], zp[half:], self.tokens[:half],
                              self.tokens[half:], self.mask[:half], self.cfg.loss, self.positions[:half, :, 1])
        terms["loss"].backward()
        self.model.zero_grad(set_to_none=True)

    def round(self, seconds: float) -> float:
        """Steps per second over about ``seconds`` (after one warm-up step)."""
        self.step()
        _sync(self.device)
        steps, start = 0, time.perf_counter()
        while True:
            self.step()
            steps += 1
            _sync(self.device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and steps >= 2:
                return steps / elapsed


def measure(preset: str, device: torch.device, rounds: int, seconds: float) -> dict[str, Any]:
    """Interleave short matmul and model rounds; best round of each, plus the median of paired ratios."""
    autocast = device.type == "cuda"
    dtype = torch.bfloat16 if autocast else torch.float32
    sizes = (1024, 2048) if device.type == "cpu" else (4096, 8192)
    case = _ModelCase(preset, device, autocast)
    matmul_rounds, step_rounds = [], []
    for _ in range(rounds):
        matmul_rounds.append(max(_matmul_round(n, device, dtype, seconds / 4) for n in sizes))
        step_rounds.append(case.round(seconds / 2))
    best_matmul, best_steps = max(matmul_rounds), max(step_rounds)
    c = case.cfg.model
    flops = case.flops_per_step * best_steps
    paired = sorted(case.flops_per_step * s / m for s, m in zip(step_rounds, matmul_rounds))
    return {
        "preset": preset, "d_model": c.d_model, "num_heads": c.num_heads, "num_layers": c.num_layers,
        "latent_dim": c.latent_dim, "tokensize": case.cfg.tokens.tokensize, "window": case.window,
        "windows_per_step": case.batch, "params": sum(p.numel() for p in case.model.parameters()),
        "tokens_per_s": round(best_steps * case.batch * case.window, 1),
        "steps_per_s": round(best_steps, 3), "achieved_gflops": round(flops / 1e9, 2),
        "matmul_gflops": round(best_matmul / 1e9, 2), "matmul_fraction": round(flops / best_matmul, 3),
        "matmul_fraction_median_of_rounds": round(paired[len(paired) // 2], 3),
        "dtype": str(dtype).replace("torch.", ""),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every preset at the process's thread count; on a multi-core CPU also ``small`` on one thread.

    The one-thread figure is the steadier one on a shared machine: a multi-threaded step of many short
    kernels loses more than one long matmul does whenever another process takes a core.
    """
    quick = bool(getattr(args, "quick", False))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    presets = ["tiny", "small"] + (["paper"] if device.type == "cuda" else [])
    rounds, seconds = (3, 1.0) if quick else (6, 1.0)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "threads": threads, "torch": torch.__version__,
                              "step": "forward + SANE loss + backward on 2 x train.batch_size windows, no optimizer",
                              "presets": {}}
    for preset in presets:
        result["presets"][preset] = measure(preset, device, rounds, seconds)
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        try:
            result["small_one_thread"] = measure("small", device, rounds, seconds)
        finally:
            torch.set_num_threads(threads)
    return result
