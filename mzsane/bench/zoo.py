"""``mzsane bench zoo``: models trained per hour batched vs one at a time, and evaluations per second.

Why measured this way: the claim worth checking is "a population trained together beats one model per
core". Both sides run in this process on ONE thread (= one core), on the same images, batch size and
optimizer: the baseline is the plain PyTorch loop (``nn.Module`` + ``torch.optim.Adam``, tensor
indexing, no DataLoader overhead), the batched side is ``population.train_population``. A "model" is
the Model Zoos protocol by default (CNN-s, 50 epochs over 50,000 MNIST images at batch 10), so models
per hour = 3600 / (seconds per step x steps per model); the ratio is what the target (>= 10x) is about.
Both sides run under the same allocator settings (``population.retain_freed_memory`` is applied first).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import epoch_order, load_dataset
from mzsane.zoo.evaluation import evaluate_models
from mzsane.zoo.population import init_population, retain_freed_memory, train_population
from mzsane.zoo.stacked import TRAIN_BUDGET_BYTES, models_per_call

PROTOCOL_EPOCHS, PROTOCOL_IMAGES = 50, 50_000
TARGET_SPEEDUP = 10.0  # models per hour batched / one model per core, at the protocol's batch 10


def _single_model_step_s(train, batch_size: int, steps: int, channels_last: bool = False) -> float:
    """Seconds per optimizer step of one CNN-s in a plain PyTorch loop (optionally channels-last, the
    layout the batched side uses: it makes the single model faster too, so it is reported as well)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(1)
    model = build_model("cnn_s", activation="tanh", init="kaiming_uniform").to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = epoch_order(len(train), 1, 1)
    start = None
    for s in range(steps + 3):
        if s == 3:
            start = time.perf_counter()
        index = order[(s * batch_size) % (len(train) - batch_size):][:batch_size]
        opt.zero_grad()
        F.cross_entropy(model(train.x[index].contiguous(memory_format=fmt)), train.y[index]).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def _population_run(train, batch_size: int, steps: int, num_models: int, backend: str) -> Callable[[], None]:
    """A warmed-up call that trains ``num_models`` CNN-s for ``steps`` steps (all advance each step)."""
    spec = {"architecture": "cnn_s", "channels_in": 1, "num_classes": 10, "image_size": 28}
    hps = [{"seed": i + 1, "lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, "batch_size": batch_size,
            "activation": "tanh", "dropout": 0.0, "init": "kaiming_uniform"} for i in range(num_models)]
    images = train.subset(batch_size * steps, seed=0)
    kw = dict(save_epochs=[], eval_splits={}, epoch0_train_images=1, backend=backend)
    train_population(spec, hps, None, 1, train=train.subset(batch_size * 2, seed=1), **kw)
    return lambda: train_population(spec, hps, None, 1, train=images, **kw)


def _population_step_s(train, batch_size: int, steps: int, num_models: int, backend: str) -> float:
    """Seconds per optimizer step of a population of ``num_models`` CNN-s."""
    run_steps = _population_run(train, batch_size, steps, num_models, backend)
    start = time.perf_counter()
    run_steps()
    return (time.perf_counter() - start) / steps


def _convolution_ms(train, batch_size: int, steps: int, num_models: int) -> float:
    """Milliseconds per model-step spent inside oneDNN's convolution kernels (forward and backward).

    Why: it bounds what batching can reach here. Even if everything but the convolutions cost nothing,
    a population step cannot beat this, so (the faster single-model step) / this is the best speedup
    available with PyTorch's CPU kernels on this machine; the >= 10x target needs that ratio above 10.
    """
    run_steps = _population_run(train, batch_size, steps, num_models, "batched")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_steps()
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if e.key in ("aten::mkldnn_convolution", "aten::convolution_backward"))
    return conv_us / 1e3 / (steps * num_models)


def _eval_rates(test, num_models: int) -> dict:
    spec = {"architecture": "cnn_s", "channels_in": 1, "num_classes": 10, "image_size": 28, "activation": "tanh"}
    sds = init_population({**spec, "init": "kaiming_uniform"}, range(1, num_models + 1))
    start = time.perf_counter()
    evaluate_models(spec, sds, test.x, test.y, batch_size=500)
    batched = time.perf_counter() - start
    model = build_model("cnn_s", activation="tanh").eval()
    start = time.perf_counter()
    with torch.no_grad():
        for sd in sds[: max(1, num_models // 8)]:
            model.load_state_dict(sd)
            for i in range(0, len(test), 500):
                F.cross_entropy(model(test.x[i:i + 500]), test.y[i:i + 500])
    single = (time.perf_counter() - start) / max(1, num_models // 8)
    return {"eval_images": len(test), "evals_per_s_batched": num_models / batched, "evals_per_s_single": 1 / single,
            "eval_speedup": single * num_models / batched}


def run(args) -> dict:
    """Both measurements on one thread; ``--quick`` uses fewer steps and models."""
    quick = bool(getattr(args, "quick", False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    retain_freed_memory()
    try:
        data = load_dataset("mnist")
        steps = 20 if quick else 60
        out: dict = {"threads": 1, "architecture": "cnn_s", "dataset": "mnist",
                     "protocol": f"{PROTOCOL_EPOCHS} epochs x {PROTOCOL_IMAGES} images", "runs": []}
        spec = {"architecture": "cnn_s", "channels_in": 1, "num_classes": 10, "image_size": 28, "activation": "tanh"}
        for batch_size, backend in ((10, "batched"), (64, "batched"), (64, "loop")):
            num_models = min(64, models_per_call(spec, batch_size, TRAIN_BUDGET_BYTES)) if backend == "batched" else 16
            single = _single_model_step_s(data.train, batch_size, steps)
            single_cl = _single_model_step_s(data.train, batch_size, steps, channels_last=True)
            batched = _population_step_s(data.train, batch_size, steps, num_models, backend)
            steps_per_model = PROTOCOL_EPOCHS * math.ceil(PROTOCOL_IMAGES / batch_size)
            out["runs"].append({
                "batch_size": batch_size, "population": num_models, "backend": backend,
                "single_step_ms": 1e3 * single, "population_step_ms": 1e3 * batched,
                "models_per_hour_single_core": 3600 / (single * steps_per_model),
                "models_per_hour_batched_core": 3600 * num_models / (batched * steps_per_model),
                "speedup": single * num_models / batched,
                "single_step_ms_channels_last": 1e3 * single_cl,
                "speedup_vs_channels_last_single": single_cl * num_models / batched})
        out.update(_eval_rates(data.test.subset(2000 if quick else 10_000, seed=0), 16 if quick else 64))
        first = out["runs"][0]
        out["speedup_batch10"] = first["speedup"]
        conv_ms = _convolution_ms(data.train, 10, steps, first["population"])
        out["batch10_convolution_ms_per_model_step"] = conv_ms
        best_single_ms = min(first["single_step_ms"], first["single_step_ms_channels_last"])  # the conservative one
        out["batch10_speedup_ceiling_convolutions_only"] = best_single_ms / conv_ms
        out["target_speedup_batch10"] = TARGET_SPEEDUP
        out["meets_target"] = first["speedup"] >= TARGET_SPEEDUP
        return out
    finally:
        torch.set_num_threads(threads)
