"""The SANE pretraining loop, written against a ``TrainContext`` so it runs with or without Ray.

Reads top to bottom: build (data, model, optimizer, schedule) -> resume -> per step
augment -> forward -> loss -> backward -> clip -> step -> schedule; evaluate every N steps on the val
split; checkpoint every N steps; log. Spec section 7 for the optimiser and schedule (AdamW with decay only
on >=2-D parameters, OneCycle stepped per batch, cosine, div 25, final div 1e4, beta1 cycled 0.85-0.95).

Sync points, explicitly: DDP's gradient all-reduce in backward; one scalar all-reduce per step so that
every rank raises together on a non-finite loss (a rank raising alone would leave the others hanging in
the next collective); the logged means every ``log_every_n_steps``; eval sums; checkpoint gathers of the
per-rank data positions and RNG states, saved by rank 0.

``Parts`` is what the loop trains; ``build_parts`` makes the real one (SANE over token shards), unit tests
pass small stand-ins. The config the loop gets is finished (``launch.finish``, on the driver): its step count and
position tables are read here, never worked out, so every rank and every checkpoint holds the same one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mzsane import metrics as metrics_mod
from mzsane import storage
from mzsane.config import Config, TrainConfig
from mzsane.errors import CheckpointError, ConfigError, DivergedError
from mzsane.model.precision import autocast_dtype
from mzsane.train import checkpoint as ckpt
from mzsane.train.context import TrainContext
from mzsane.train.data import RankStream

LossFn = Callable[[nn.Module, list, torch.Generator, TrainContext], dict[str, torch.Tensor]]


@dataclass
class Parts:
    """What the loop trains: ``loss_fn(model, batch, generator, ctx)`` returns ``{"loss": ..., other terms}``."""

    model: nn.Module
    loss_fn: LossFn
    train: RankStream
    val_batches: Callable[[], Iterable[list]]
    tokens_per_sample: int
    exposure: Any = None  # mzsane.train.budget.Exposure: per-zoo counts of what training consumed (real parts)
    budget: Any = None  # mzsane.train.budget.Budget of this run's selection, for exposure.json (real parts)
    # (real tokens, positions computed) of one view of a batch; None: tokens_per_sample per sample, no padding
    token_counts: Callable[[list], tuple[int, int]] | None = None


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on parameters with >= 2 dimensions (spec 7.1).

    Fused (one kernel over all parameters) where every parameter is a float tensor on the CPU or a GPU: the
    same update, and on this project's 2-core CPU ~5x faster than the default multi-tensor one (2.1 -> 0.4 ms a
    step for the default preset's 1.2M parameters, ~20 -> 2.5 ms for small's 7.9M; issue 29), which is a few
    percent of a whole step (measured with a sweep beside it). Its state dict is the default one's, so checkpoints
    resume either way."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=tc.lr, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=tc.lr, total_steps=max(tc.num_steps, 1), pct_start=tc.pct_start, anneal_strategy="cos",
        div_factor=25.0, final_div_factor=1e4, cycle_momentum=True, base_momentum=0.85, max_momentum=0.95)


def _every(n: int, done: int, last: int) -> bool:
    return (n > 0 and done % n == 0) or done == last


def train_loop(cfg: Config, ctx: TrainContext, run_url: str, parts: Parts | None = None) -> dict[str, float]:
    """Train until ``cfg.train.num_steps`` (resuming from the context's latest checkpoint) and return the
    last logged metrics; ``cfg`` is finished (``launch.finish``) and saved as it is in every checkpoint."""
    tc = cfg.train
    run = os.path.basename(run_url.rstrip("/"))
    # ------------------------------------------------------------------------------------ build
    parts = parts or build_parts(cfg, ctx)
    raw_model = parts.model.to(ctx.device)
    optimizer = make_optimizer(raw_model, tc)
    scheduler = make_scheduler(optimizer, tc)
    amp_dtype = autocast_dtype(tc.precision, ctx.device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(tc.seed * 100_003 + ctx.world_rank)
    torch.manual_seed(tc.seed * 100_003 + ctx.world_rank)  # dropout and other global draws
    # ----------------------------------------------------------------------------------- resume
    start = 0
    latest = ctx.latest_checkpoint()
    if latest is not None:
        weights, state, _ = ckpt.load(latest, cfg)
        planned = int(state["scheduler"].get("total_steps", max(tc.num_steps, 1)))
        if planned != max(tc.num_steps, 1):
            # the one-cycle schedule is shaped by its length: stretching it mid-run would jump the LR
            raise CheckpointError(f"checkpoint '{latest}' belongs to a {planned}-step schedule, this run asks for "
                                  f"{tc.num_steps}; resume with train.num_steps={planned} or start a new run name")
        raw_model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        ranks = state["ranks"]
        if len(ranks) != ctx.world_size:
            raise CheckpointError(f"checkpoint '{latest}' was written by {len(ranks)} workers, this run has "
                                  f"{ctx.world_size}; resume with cluster.num_workers={len(ranks)}")
        mine = ranks[ctx.world_rank]
        parts.train.restore(mine["data"])
        if parts.exposure is not None and "exposure" in mine:
            parts.exposure.counts = type(parts.exposure)(mine["exposure"]).counts
        generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        if torch.cuda.is_available() and "cuda_rng" in mine:
            torch.cuda.set_rng_state(mine["cuda_rng"])
    model = ctx.wrap_model(raw_model)
    if tc.compile:
        model = torch.compile(model)
    sink, target = metrics_mod.make_sink(cfg.metrics, run, run_url, ctx.world_rank, ctx.local_rank,
                                         ctx.node, start_step=start)
    _announce(ctx, run_url, target, start)
    bar = _progress(ctx, start, tc.num_steps)
    # ------------------------------------------------------------------------------------- steps
    sums: dict[str, torch.Tensor] = {}
    step_times: list[float] = []
    wait_mark, samples_mark, steps_mark = parts.train.wait_s, parts.train.samples, 0
    real_tokens, positions = 0, 0  # since the last log: tokens of the models, and the positions computed
    last: dict[str, float] = {}
    try:
        for done in range(start + 1, tc.num_steps + 1):
            t0 = time.perf_counter()
            batch = next(parts.train)
            real, padded = (parts.token_counts(batch) if parts.token_counts is not None
                            else (len(batch) * parts.tokens_per_sample,) * 2)
            real_tokens, positions = real_tokens + real, positions + padded
            model.train()
            with _autocast(ctx.device, amp_dtype):
                terms = parts.loss_fn(model, batch, generator, ctx)
            loss = terms["loss"]
            _check_finite(ctx, done, terms)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = _clip(model, tc.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            step_times.append(time.perf_counter() - t0)
            steps_mark += 1
            # -------------------------------------------------------------------------- log
            metrics: dict[str, Any] = {}
            if _every(tc.log_every_n_steps, done, tc.num_steps):
                metrics.update(_mean_terms(ctx, sums, steps_mark, "train/"))
                wait = parts.train.wait_s - wait_mark
                metrics.update({
                    "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                    "train/samples": parts.train.samples - samples_mark, "train/steps": steps_mark,
                    "perf/step_time_s": step_times, "perf/data_wait_s": wait,
                    # the list above goes to Prometheus' histogram only; log.jsonl keeps these two (bench train)
                    "perf/step_time_median_s": statistics.median(step_times), "perf/step_time_sum_s": sum(step_times),
                    "perf/data_wait_fraction": wait / max(sum(step_times), 1e-9),
                    # positions computed (padding included) and the models' own tokens, one view, per second
                    "perf/tokens_per_s": positions / max(sum(step_times), 1e-9),
                    "perf/real_tokens_per_s": real_tokens / max(sum(step_times), 1e-9),
                    "perf/real_tokens": real_tokens, "perf/positions": positions,
                    "mem/host_rss_bytes": metrics_mod.host_rss_bytes(), "train/target_steps": tc.num_steps})
                stats = getattr(parts.train, "stats", None)  # the shard stream's reads (dashboard: bytes/epoch)
                if stats is not None:
                    metrics.update({"data/read_bytes": stats.bytes_read, "data/rows": stats.rows})
                if ctx.device.type == "cuda":
                    metrics["mem/gpu_bytes"] = torch.cuda.memory_allocated(ctx.device)
                sums, step_times, steps_mark, real_tokens, positions = {}, [], 0, 0, 0
                wait_mark, samples_mark = parts.train.wait_s, parts.train.samples
            # -------------------------------------------------------------------------- eval
            if tc.eval_every_n_steps > 0 and _every(tc.eval_every_n_steps, done, tc.num_steps):
                metrics.update(evaluate(model, parts, ctx, amp_dtype, seed=tc.seed))
            # -------------------------------------------------------------------- checkpoint
            if _every(tc.checkpoint_every_n_steps, done, tc.num_steps):
                t_save = time.perf_counter()
                _checkpoint(ctx, raw_model, optimizer, scheduler, scaler, generator, parts, cfg, done,
                            {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                metrics["checkpoint/save_s"] = time.perf_counter() - t_save
                metrics["checkpoint/last_time"] = time.time()  # checkpoint age = time() - this (alerts)
            if metrics:
                sink.log(metrics, done)
                last.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if bar is not None:
                bar.update(1)
                if "train/loss" in metrics:
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
    finally:
        parts.train.close()
        sink.close()
        if bar is not None:
            bar.close()
    last["step"] = tc.num_steps
    _write_exposure(ctx, parts, run_url)
    return last


# ------------------------------------------------------------------------------------------ helpers


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _check_finite(ctx: TrainContext, step: int, terms: dict[str, torch.Tensor]) -> None:
    """Fail the step loudly, on every rank at once, naming the non-finite terms."""
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    flag = ctx.all_reduce_sum(torch.tensor([float(len(bad) > 0)], device=ctx.device))
    if float(flag.item()) > 0:
        where = f"rank {ctx.world_rank}: {', '.join(bad)}" if bad else "another rank"
        raise DivergedError(f"non-finite loss at step {step} ({where}); lower train.lr, set train.grad_clip, "
                                 f"or check the shards for diverged checkpoints")


def _clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))


def _mean_terms(ctx: TrainContext, sums: dict[str, torch.Tensor], count: int, prefix: str) -> dict[str, float]:
    """Per-step means of the loss terms, averaged over ranks (one all-reduce)."""
    keys = sorted(sums)
    if not keys:
        return {}
    packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in keys]).to(ctx.device)
    packed = ctx.all_reduce_sum(packed) / (max(count, 1) * ctx.world_size)
    return {prefix + k: float(v) for k, v in zip(keys, packed.tolist())}


@torch.no_grad()
def evaluate(model: nn.Module, parts: Parts, ctx: TrainContext, amp_dtype: torch.dtype | None,
             seed: int = 0) -> dict[str, float]:
    """Mean loss terms over the fixed val batches (same augmentation draws every time), over all ranks."""
    model.eval()
    generator = torch.Generator().manual_seed(seed + 7919 * (ctx.world_rank + 1))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in parts.val_batches():
        with _autocast(ctx.device, amp_dtype):
            terms = parts.loss_fn(model, batch, generator, ctx)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
        count += 1
    keys = ["loss", "loss_recon", "loss_contrast", "rsq"]
    packed = torch.tensor([float(sums.get(k, 0.0)) for k in keys] + [float(count)], device=ctx.device)
    packed = ctx.all_reduce_sum(packed)
    total = float(packed[-1])
    model.train()
    if total == 0:
        return {}
    return {f"val/{k}": float(v) / total for k, v in zip(keys, packed[:-1].tolist())}


def _checkpoint(ctx: TrainContext, raw_model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any, generator: torch.Generator, parts: Parts, cfg: Config, step: int,
                metrics: dict[str, float]) -> None:
    mine = {"data": parts.train.position, "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if parts.exposure is not None:
        mine["exposure"] = parts.exposure.state()
    if torch.cuda.is_available():
        mine["cuda_rng"] = torch.cuda.get_rng_state()
    ranks = ctx.all_gather_object(mine)
    directory = None
    scratch = tempfile.mkdtemp(prefix="mzsane-save-")
    try:
        if ctx.world_rank == 0:
            directory = os.path.join(scratch, ckpt.checkpoint_name(step))
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "ranks": ranks}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            ckpt.save(directory, raw_model, state, cfg)
        ctx.report({"step": step, **metrics}, directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_exposure(ctx: TrainContext, parts: Parts, run_url: str) -> None:
    """Rank 0 writes ``{run}/exposure.json``: the step budget and what each zoo contributed, summed over ranks."""
    if parts.exposure is None or parts.budget is None:
        return
    from mzsane.train import budget as budget_mod

    states = ctx.all_gather_object(parts.exposure.state())
    if ctx.world_rank == 0:
        out = budget_mod.summary(parts.budget, budget_mod.Exposure.merge(states))
        storage.write_json(storage.join(run_url, budget_mod.EXPOSURE_FILE), out)


def _announce(ctx: TrainContext, run_url: str, target: str, start: int) -> None:
    """Who runs where: ``{run}/workers/rank_{r}.json`` (pid, node, scrape target) and rank 0's
    ``metrics_targets.json`` for Prometheus file_sd."""
    info = {"world_rank": ctx.world_rank, "world_size": ctx.world_size, "pid": os.getpid(),
            "node": ctx.node, "metrics_target": target, "start_step": start, "time": time.time(),
            "torch_threads": torch.get_num_threads()}
    storage.write_json(storage.join(run_url, "workers", f"rank_{ctx.world_rank}.json"), info)
    targets = ctx.all_gather_object(target)
    if ctx.world_rank == 0:
        metrics_mod.write_targets(run_url, targets)


def _progress(ctx: TrainContext, start: int, total: int) -> Any:
    if not getattr(ctx, "show_progress", False):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------ the real parts


def build_parts(cfg: Config, ctx: TrainContext) -> Parts:
    """SANE over this rank's part of the token shards, with the two-view augmentation and the SANE loss."""
    from mzsane.model.losses import sane_loss
    from mzsane.model.sane import SANE
    from mzsane.train.budget import Exposure, measure
    from mzsane.train.data import shard_streams

    if not cfg.model.max_positions or cfg.cluster.num_workers != ctx.world_size:
        raise ConfigError(f"the training config is not finished for this run (model.max_positions="
                          f"{cfg.model.max_positions}, cluster.num_workers={cfg.cluster.num_workers} for "
                          f"{ctx.world_size} ranks); finish it with mzsane.train.launch.finish or train through "
                          f"mzsane train")
    manifest, stream, val_batches = shard_streams(cfg, ctx.world_rank, ctx.world_size)
    budget = measure(cfg, manifest, stream.selection, ctx.world_size)
    exposure = Exposure()
    augmenter = stream.augmenter  # the stream cut the windows and view 2's gather; make_views adds the noise
    model = SANE(cfg.model, cfg.tokens.tokensize, cfg.model.max_positions,
                 generator=torch.Generator().manual_seed(cfg.train.seed))

    def loss_fn(model: nn.Module, batch: list, generator: torch.Generator, ctx: TrainContext) -> dict:
        views = augmenter.make_views(batch, generator)
        if model.training:  # training batches only, not the val batches of evaluate()
            exposure.add([s.zoo for s in batch], views.valid_BT, views.mask_BTD)
        dev = ctx.device
        v1, v2 = views.view1_BTD.to(dev, non_blocking=True), views.view2_BTD.to(dev, non_blocking=True)
        pos, valid = views.positions_BTP.to(dev), views.valid_BT.to(dev)
        b = v1.shape[0]
        # both views in one forward: one DDP forward per backward, one kernel launch per layer
        _, zp_BF, recon_BTD = model(torch.cat([v1, v2]), torch.cat([pos, pos]), torch.cat([valid, valid]))
        gather = ctx.all_gather_tensor if ctx.world_size > 1 else None
        return sane_loss(recon_BTD[:b], recon_BTD[b:], zp_BF[:b], zp_BF[b:], v1, v2, views.mask_BTD.to(dev),
                         cfg.loss, layer_BT=pos[..., 1], gather=gather)

    return Parts(model=model, loss_fn=loss_fn, train=stream, val_batches=val_batches,
                 tokens_per_sample=cfg.data.window_size, exposure=exposure, budget=budget,
                 token_counts=augmenter.token_counts)
