"""The training loop under ``LocalContext`` (no Ray): learning, exact resume, guards, DDP equivalence.

Stand-in parts (a tiny autoencoder over seeded random tokens) prove the loop itself; the real SANE over
real shards is exercised by ``test_sane_tiny_loss_falls`` and the Ray integration test.
"""
from __future__ import annotations

import functools
import json
import os
import socket

import pytest
import torch
from torch import nn

from mzsane import config as config_mod
from mzsane import presets
from mzsane.errors import CheckpointError
from mzsane.train import checkpoint as ckpt
from mzsane.train import launch
from mzsane.train.context import LocalContext
from mzsane.train.data import RankStream
from mzsane.train.loop import Parts, make_optimizer, train_loop
from tests.fixtures.zoos import make_shards, make_zoo

D = 8
NUM_SAMPLES = 48


class TinyAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(D, 4)
        self.norm = nn.LayerNorm(4)
        self.dec = nn.Linear(4, D)

    def forward(self, x):
        return self.dec(torch.tanh(self.norm(self.enc(x))))


def _dataset() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    basis = torch.randn(3, D, generator=g)
    return torch.randn(NUM_SAMPLES, 3, generator=g) @ basis  # rank-3 data: learnable


def _open_epoch(rank: int, world: int, per_rank_batch: int):
    data = _dataset()

    def open_epoch(epoch: int):
        order = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(epoch))
        # block k of size world*b goes to ranks in contiguous slices of b: rank r of 2 (batch b) sees exactly
        # the half of what 1 rank (batch 2b) sees in the same step
        block = world * per_rank_batch
        for start in range(0, NUM_SAMPLES - block + 1, block):
            for i in range(start + rank * per_rank_batch, start + (rank + 1) * per_rank_batch):
                yield data[order[i]]

    return open_epoch


def _parts(cfg, rank=0, world=1, noise=0.05, fail_at=None, nan_at=None) -> Parts:
    calls = {"n": 0}

    def loss_fn(model, batch, generator, ctx):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise RuntimeError("simulated crash")
        x = torch.stack(batch)
        noisy = x + noise * torch.randn(x.shape, generator=generator) if noise else x
        recon = model(noisy)
        loss = ((recon - x) ** 2).mean()
        if nan_at is not None and calls["n"] == nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "loss_recon": loss.detach()}

    stream = RankStream(_open_epoch(rank, world, cfg.train.batch_size), cfg.train.batch_size, 2)
    return Parts(model=TinyAE(), loss_fn=loss_fn, train=stream, val_batches=lambda: iter([list(_dataset()[:8])]),
                 tokens_per_sample=D)


def _cfg(**train) -> config_mod.Config:
    cfg = presets.tiny()
    cfg.metrics.enabled = False
    cfg.train.num_steps = 20
    cfg.train.batch_size = 4
    cfg.train.lr = 3e-2
    cfg.train.log_every_n_steps = 1
    cfg.train.checkpoint_every_n_steps = 10
    cfg.train.eval_every_n_steps = 10
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _losses(run_url: str) -> dict[int, float]:
    """Last logged train loss per step (a resumed run logs the replayed steps again)."""
    out = {}
    with open(os.path.join(run_url, "log.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if "train/loss" in row:
                out[row["step"]] = row["train/loss"]
    return out


def test_loss_falls_and_checkpoints_are_complete(tmp_path):
    cfg = _cfg(num_steps=60, eval_every_n_steps=30, checkpoint_every_n_steps=20)
    run = str(tmp_path / "run")
    last = train_loop(cfg, LocalContext(run, num_to_keep=2), run, _parts(cfg))
    losses = _losses(run)
    assert sum(list(losses.values())[-5:]) / 5 < 0.5 * sum(list(losses.values())[:5]) / 5
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [40, 60]  # num_to_keep=2 pruned step 20
    assert "val/loss" in last and last["step"] == 60
    _, state, saved = ckpt.load(ckpt.latest_checkpoint_url(run), cfg)
    assert state["step"] == 60 and state["ranks"][0]["data"]["epoch"] >= 1
    assert saved.train.num_steps == 60


def test_resume_reproduces_the_uninterrupted_loss(tmp_path):
    cfg = _cfg()
    straight = str(tmp_path / "straight")
    train_loop(cfg, LocalContext(straight), straight, _parts(cfg))
    crashed = str(tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(cfg, LocalContext(crashed), crashed, _parts(cfg, fail_at=14))
    assert [s for s, _ in ckpt.list_checkpoints(crashed)] == [10]
    train_loop(cfg, LocalContext(crashed), crashed, _parts(cfg))
    a, b = _losses(straight), _losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"


def test_non_finite_loss_fails_the_step_loudly(tmp_path):
    cfg = _cfg()
    run = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 3 .*loss, loss_recon"):
        train_loop(cfg, LocalContext(run), run, _parts(cfg, nan_at=3))


def test_adamw_decays_only_matrices():
    model = TinyAE()
    opt = make_optimizer(model, _cfg(weight_decay=0.1).train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


def test_adamw_is_fused_steps_like_the_default_one_and_resumes_its_state():
    """The fused kernel (issue 29's speed-up) makes the default multi-tensor update, and a checkpoint written by
    the default optimizer (runs before the change) resumes into it."""
    torch.manual_seed(0)
    fused_model, plain_model = TinyAE(), TinyAE()
    plain_model.load_state_dict(fused_model.state_dict())
    tc = _cfg(weight_decay=0.1, lr=1e-2).train
    fused = make_optimizer(fused_model, tc)
    plain = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                               for g in make_optimizer(plain_model, tc).param_groups], lr=tc.lr)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for step in range(3):
        for model in (fused_model, plain_model):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.1 * (i + 1) * (step + 1)).sin()
        fused.step()
        plain.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = make_optimizer(plain_model, tc)
    resumed.load_state_dict(plain.state_dict())
    resumed.step()  # the default optimizer's state drives the fused kernel
    assert all(torch.isfinite(p).all() for p in plain_model.parameters())


def test_onecycle_schedule_follows_spec(tmp_path):
    cfg = _cfg(num_steps=10, lr=1e-3, pct_start=0.3)
    from mzsane.train.loop import make_scheduler

    opt = make_optimizer(TinyAE(), cfg.train)
    sched = make_scheduler(opt, cfg.train)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 25)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.95)
    lrs = []  # the learning rate each of the 10 optimizer steps uses
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6) and lrs.index(max(lrs)) == 2  # pct_start * total - 1
    assert lrs[-1] == pytest.approx(1e-3 / 25 / 1e4, rel=1e-3)


def test_compiled_model_saves_without_prefixes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = _cfg(num_steps=4, compile=True, checkpoint_every_n_steps=4, eval_every_n_steps=-1)
    run = str(tmp_path / "run")
    train_loop(cfg, LocalContext(run), run, _parts(cfg))
    weights, _, _ = ckpt.load(ckpt.latest_checkpoint_url(run))
    assert sorted(weights) == sorted(TinyAE().state_dict())


def test_incompatible_checkpoint_is_one_line(tmp_path):
    cfg = _cfg(num_steps=2, checkpoint_every_n_steps=2)
    run = str(tmp_path / "run")
    train_loop(cfg, LocalContext(run), run, _parts(cfg))
    other = _cfg(num_steps=4)
    other.model.d_model = 64
    with pytest.raises(CheckpointError, match=r"incompatible config: model.d_model=32 \(now 64\)") as err:
        train_loop(other, LocalContext(run), run, _parts(other))
    assert "\n" not in str(err.value)


def test_resume_with_another_schedule_length_is_one_line(tmp_path):
    cfg = _cfg(num_steps=4, checkpoint_every_n_steps=2)
    run = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_loop(cfg, LocalContext(run), run, _parts(cfg, fail_at=3))
    longer = _cfg(num_steps=8, checkpoint_every_n_steps=2)
    with pytest.raises(CheckpointError, match=r"4-step schedule.*train.num_steps=4") as err:
        train_loop(longer, LocalContext(run), run, _parts(longer))
    assert "\n" not in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]  # the refused resume wrote nothing


# --------------------------------------------------------------- 2 ranks x batch b == 1 rank x batch 2b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, run: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # fp32: the exact match below is DDP's arithmetic, which bf16 autocast (auto on a bf16 CPU) would round
        cfg = _cfg(num_steps=6, batch_size=3, checkpoint_every_n_steps=6, eval_every_n_steps=-1, grad_clip=0.0,
                   precision="fp32")
        train_loop(cfg, LocalContext(run), run, _parts(cfg, rank, world, noise=0.0))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~50 s on 2 shared cores
def test_two_ranks_with_batch_b_match_one_rank_with_batch_2b(tmp_path):
    """Spawned ranks: forking after torch started its threads can deadlock the children."""
    import torch.multiprocessing as mp

    two = str(tmp_path / "two")
    mp.start_processes(_ddp_rank, args=(2, _free_port(), two), nprocs=2, join=True, start_method="spawn")
    cfg = _cfg(num_steps=6, batch_size=6, checkpoint_every_n_steps=6, eval_every_n_steps=-1, grad_clip=0.0,
               precision="fp32")
    one = str(tmp_path / "one")
    train_loop(cfg, LocalContext(one), one, _parts(cfg, noise=0.0))
    w2, s2, _ = ckpt.load(ckpt.latest_checkpoint_url(two))
    w1, s1, _ = ckpt.load(ckpt.latest_checkpoint_url(one))
    assert len(s2["ranks"]) == 2 and len(s1["ranks"]) == 1
    moved = (w1["enc.weight"] - TinyAE().state_dict()["enc.weight"]).abs().max()
    assert moved > 1e-3
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ the real SANE over real shards


def test_sane_tiny_loss_falls(tmp_path):
    cfg = presets.tiny()
    cfg.metrics.enabled = False
    cfg.storage.root = str(tmp_path)
    make_shards(str(tmp_path))
    cfg.train.num_steps = 40
    cfg.train.lr = 3e-3
    cfg.train.log_every_n_steps = 1
    cfg.train.eval_every_n_steps = 40
    cfg.train.checkpoint_every_n_steps = 40
    run = str(tmp_path / "runs" / "r")
    launch.finish(cfg, 1)
    last = train_loop(cfg, LocalContext(run), run)
    losses = list(_losses(run).values())
    assert sum(losses[-8:]) < 0.95 * sum(losses[:8])
    assert "val/loss" in last
    _, _, saved = ckpt.load(ckpt.latest_checkpoint_url(run))
    assert saved.model.max_positions and all(m > 0 for m in saved.model.max_positions)


def test_backbone_tables_follow_the_selected_zoos_not_the_whole_dataset(tmp_path):
    """Training on one zoo of a two-architecture shard dataset sizes the position tables for that zoo: adding
    a ResNet zoo to shared shards must not change (and re-seed) a cnn_s backbone. Sized once, on the driver
    (``launch.prepare``), for the loop with or without Ray."""
    from mzsane import storage
    from mzsane.shards import writer
    from mzsane.shards.manifest import read_manifest
    from mzsane.train import launch

    cfg = presets.tiny()
    cfg.metrics.enabled = False
    cfg.storage.root = str(tmp_path)
    zoos = [make_zoo(str(tmp_path / "zoos"), "za", num_models=6), make_zoo(str(tmp_path / "zoos"), "zb",
                                                                             "resnet_mini", num_models=4, seed=1)]
    shards = storage.join(str(tmp_path), "shards", "default")
    writer.build_shards(zoos, shards, cfg.tokens, cfg.shards, progress=False)
    manifest = read_manifest(shards)
    want = manifest.max_positions_for(["za"])
    assert want != manifest.max_positions  # the dataset's tables are the ResNet's
    cfg.data.zoos = ["za"]
    cfg.train.num_steps = cfg.train.eval_every_n_steps = cfg.train.checkpoint_every_n_steps = 2
    cfg.run_name = "r"
    resolved, run = launch.prepare(cfg, no_ray=True)
    assert resolved.model.max_positions == want
    train_loop(resolved, LocalContext(run), run)
    _, _, saved = ckpt.load(ckpt.latest_checkpoint_url(run))
    assert saved.model.max_positions == want
