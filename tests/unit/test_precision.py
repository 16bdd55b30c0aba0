"""Training's and sampling's precision on CPU: bf16 projections, fp32 attention, and the peak a bf16 step is
measured against (issue 29)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mzsane import presets
from mzsane.bench import trainstep
from mzsane.model import precision
from mzsane.model.sane import SANE

CPU = torch.device("cpu")


def test_autocast_dtype_on_cpu_follows_the_request_and_the_hardware(monkeypatch):
    assert precision.autocast_dtype("fp32", CPU) is None
    assert precision.autocast_dtype("bf16", CPU) == torch.bfloat16  # asked for: even if emulated
    assert precision.autocast_dtype("fp16", CPU) is None  # no CPU fp16 kernels worth using
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype("auto", CPU) == torch.bfloat16
    assert precision.compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.autocast_dtype("auto", CPU) is None
    assert precision.compute_dtype("auto", "cpu") == torch.float32
    assert precision.compute_dtype("bf16", "cpu") == torch.bfloat16


def _model_and_batch():
    cfg = presets.tiny()
    torch.manual_seed(0)
    model = SANE(cfg.model, 12, [32, 8, 16])
    tokens_BTD = torch.randn(3, 10, 12)
    positions_BTP = torch.stack([torch.arange(10), torch.arange(10) // 4, torch.arange(10) % 5], -1)
    return model, tokens_BTD, positions_BTP[None].expand(3, 10, 3).contiguous()


def test_cpu_autocast_runs_attention_in_fp32_and_computes_the_same_function(monkeypatch):
    model, tokens_BTD, positions_BTP = _model_and_batch()
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    _, _, want_BTD = model(tokens_BTD, positions_BTP)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, got_BTD = model(tokens_BTD, positions_BTP)
    assert seen and set(seen) == {torch.float32}  # the bf16 flash-attention backward is the slow CPU kernel
    err = (got_BTD.float() - want_BTD).norm() / want_BTD.norm()
    assert 0 < float(err.detach()) < 0.03  # bf16 projections: close to fp32, not identical


def test_a_bf16_backbone_decodes_on_cpu(monkeypatch):
    """Sampling loads the backbone in bf16 (no autocast): attention runs fp32 and hands bf16 back."""
    model, tokens_BTD, positions_BTP = _model_and_batch()
    _, _, want_BTD = model(tokens_BTD, positions_BTP)
    _, _, got_BTD = model.to(torch.bfloat16)(tokens_BTD.to(torch.bfloat16), positions_BTP)
    assert got_BTD.dtype == torch.bfloat16
    assert float((got_BTD.float() - want_BTD).norm() / want_BTD.norm()) < 0.05


def test_bf16_training_steps_reduce_the_loss_on_cpu():
    model, tokens_BTD, positions_BTP = _model_and_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, recon_BTD = model(tokens_BTD, positions_BTP)
        loss = (recon_BTD.float() - tokens_BTD).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert losses[-1] < 0.5 * losses[0]


def test_a_bf16_step_is_measured_against_the_bf16_peak():
    runs = {"fp32": [{"threads_total": 2, "matmul_dtype": "float32", "achieved_gflops": 50.0,
                      "achieved_real_gflops": 40.0}],
            "bf16": [{"threads_total": 1, "matmul_dtype": "bfloat16", "achieved_gflops": 150.0,
                      "achieved_real_gflops": 150.0}]}
    trainstep.renormalize(runs, {("float32", 2): 100e9, ("bfloat16", 2): 400e9})
    assert runs["fp32"][0]["mfu"] == 0.5 and runs["fp32"][0]["mfu_real"] == 0.4
    assert runs["bf16"][0]["peak_gflops"] == 200.0 and runs["bf16"][0]["mfu"] == 0.75
    cfg = presets.demo()
    cfg.train.precision = "bf16"
    assert trainstep.matmul_dtype(cfg) == torch.bfloat16
    cfg.train.precision = "fp32"
    assert trainstep.matmul_dtype(cfg) == torch.float32


def test_bench_train_runs_only_the_cases_asked_for(monkeypatch, tmp_path):
    import pytest

    from mzsane.bench import train
    from mzsane.errors import ConfigError

    seen = {}
    monkeypatch.setattr(train, "synthetic_shards", lambda *a, **k: str(tmp_path / "cnn"))
    monkeypatch.setattr(train, "resnet_shards", lambda *a, **k: str(tmp_path / "resnet"))
    monkeypatch.setattr(trainstep, "measure", lambda cases, repeats: seen.update(cases) or {n: {} for n in cases})
    out = train.demo_steps(str(tmp_path), 10, 1, only="cnn_ray_2x1, cnn_ray_2x1_fp32")
    assert sorted(out) == sorted(seen) == ["cnn_ray_2x1", "cnn_ray_2x1_fp32"]
    assert seen["cnn_ray_2x1_fp32"][0].train.precision == "fp32"
    assert seen["cnn_ray_2x1"][0].train.precision == "auto" and seen["cnn_ray_2x1"][1:] == (2, 1)
    with pytest.raises(ConfigError, match="unknown case.*cnn_ray_9x9.*the cases are cnn_ray_2x1_padded"):
        train.demo_steps(str(tmp_path), 10, 1, only="cnn_ray_9x9")
