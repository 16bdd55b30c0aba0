"""Masked loss normalization and NT-Xent against independent hand computations (numpy loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mzsane.config import LossConfig
from mzsane.errors import ConfigError
from mzsane.model.losses import nt_xent, r_squared, reconstruction_loss, sane_loss

EPS = 1e-4


def _batch(seed=0, B=3, T=5, D=6):
    """Targets with per-token scales, padded tokens, BN-like tokens (1-2 valid values) and a constant token."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(B, T, 1, generator=g, dtype=torch.float64) * 3
    target = torch.randn(B, T, D, generator=g, dtype=torch.float64) * scale
    pred = target + 0.3 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, D, generator=g) < 0.8
    mask[0, 0] = False
    mask[0, 0, :2] = True  # BN-like token: 2 valid values
    mask[1, 1] = False
    mask[1, 1, 0] = True  # 1 valid value
    mask[2, 4] = False  # padded token
    mask[1, 2] = True
    target[1, 2] = 0.01  # constant token (a freshly initialised bias-only row)
    layer = torch.randint(0, 3, (B, T), generator=g)
    return pred, target, mask, layer


def _hand_loss(pred, target, mask, mode, layer=None, min_valid=3):
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()
    B, T, D = p.shape
    vals = [t[b, i, d] for b in range(B) for i in range(T) for d in range(D) if m[b, i, d]]
    batch_std = float(np.std(vals))
    groups: dict = {}
    for b in range(B):
        for i in range(T):
            key = (b, i) if mode == "token" else (b, int(layer[b, i]))
            groups.setdefault(key, []).extend(t[b, i, d] for d in range(D) if m[b, i, d])
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mode == "none":
                s = 1.0
            elif mode == "batch":
                s = batch_std + EPS
            else:
                vals_g = groups[(b, i) if mode == "token" else (b, int(layer[b, i]))]
                std = float(np.std(vals_g)) if vals_g else 0.0
                s = (batch_std if len(vals_g) < min_valid or std < EPS else std) + EPS
            for d in range(D):
                if m[b, i, d]:
                    total += ((p[b, i, d] - t[b, i, d]) / s) ** 2
                    count += 1
    return total / count


@pytest.mark.parametrize("mode", ["none", "batch", "token", "layer"])
def test_each_mode_matches_a_hand_computation(mode):
    pred, target, mask, layer = _batch()
    got = reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer, min_valid_per_token=3)
    assert got.item() == pytest.approx(_hand_loss(pred, target, mask, mode, layer), rel=1e-10)


def test_batch_mode_is_masked_mse_over_squared_std_plus_eps():
    pred, target, mask, _ = _batch(1)
    mse = ((pred - target)[mask] ** 2).mean()
    sigma = target[mask].std(unbiased=False)
    got = reconstruction_loss(pred, target, mask, "batch", EPS)
    assert got.item() == pytest.approx((mse / (sigma + EPS) ** 2).item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["none", "batch", "token", "layer"])
def test_padding_never_changes_loss_or_gradients(mode):
    pred, target, mask, layer = _batch(2)
    results = []
    for fill in (0.0, 1e6, -3.0):
        p = torch.where(mask, pred, fill).requires_grad_()
        t = torch.where(mask, target, -fill)
        loss = reconstruction_loss(p, t, mask, mode, EPS, layer_BT=layer)
        loss.backward()
        results.append((loss.detach(), p.grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])
    assert (results[0][1][~mask] == 0).all()


def test_no_gradient_flows_through_the_statistics():
    pred, target, mask, _ = _batch(3)
    p = pred.clone().requires_grad_()
    t = target.clone().requires_grad_()
    loss = reconstruction_loss(p, t, mask, "batch", EPS)
    loss.backward()
    s = target[mask].std(unbiased=False) + EPS
    expected = torch.where(mask, 2 * (pred - target) / s ** 2 / mask.sum(), 0.0)
    assert torch.allclose(p.grad, expected, rtol=1e-10, atol=0)
    assert t.grad is None  # targets are data


def test_unknown_mode_and_missing_layers_raise():
    pred, target, mask, _ = _batch()
    with pytest.raises(ConfigError, match="norm_mode"):
        reconstruction_loss(pred, target, mask, "rows", EPS)
    with pytest.raises(ConfigError, match="layer"):
        reconstruction_loss(pred, target, mask, "layer", EPS)


def _hand_nt_xent(zi, zj, tau):
    z = np.concatenate([zi, zj]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    half = n2 // 2
    total = 0.0
    for a in range(n2):
        pos = (a + half) % n2
        logits = [z[a] @ z[c] / tau for c in range(n2) if c != a]
        total += -(z[a] @ z[pos] / tau) + math.log(sum(math.exp(x) for x in logits))
    return total / n2


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_nt_xent_matches_a_hand_computation(batch):
    g = torch.Generator().manual_seed(batch)
    zi, zj = torch.randn(batch, 5, generator=g), torch.randn(batch, 5, generator=g)
    got = nt_xent(zi, zj, 0.1)
    assert got.item() == pytest.approx(_hand_nt_xent(zi.numpy(), zj.numpy(), 0.1), rel=1e-5, abs=1e-6)


def test_gathered_nt_xent_equals_the_big_batch():
    """2 ranks x b with a concatenating gather == 1 rank x 2b, in value and (after DDP's mean) in gradient."""
    g = torch.Generator().manual_seed(0)
    zi, zj = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    big_i, big_j = zi.clone().requires_grad_(), zj.clone().requires_grad_()
    big = nt_xent(big_i, big_j, 0.2)
    big.backward()
    world, b = 2, 4
    for rank in range(world):
        sl = slice(rank * b, (rank + 1) * b)
        li, lj = zi[sl].clone().requires_grad_(), zj[sl].clone().requires_grad_()

        def gather(x, full_i=zi, full_j=zj):
            full = full_i if x is li else full_j
            parts = [full[r * b:(r + 1) * b] for r in range(world)]
            parts[rank] = x  # the local part keeps its graph; the others are constants
            return torch.cat(parts)

        loss = nt_xent(li, lj, 0.2, gather=gather)
        assert loss.item() == pytest.approx(big.item(), rel=1e-12)
        loss.backward()
        # DDP averages gradients over ranks; the local embeddings' gradient / world is the big-batch one
        assert torch.allclose(li.grad / world, big_i.grad[sl], rtol=1e-10, atol=1e-14)
        assert torch.allclose(lj.grad / world, big_j.grad[sl], rtol=1e-10, atol=1e-14)


def test_sane_loss_terms_and_gamma():
    pred, target, mask, layer = _batch(4)
    pred, target = pred.float(), target.float()
    g = torch.Generator().manual_seed(0)
    zi, zj = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    cfg = LossConfig(gamma=0.25, norm_mode="batch", std_eps=EPS, temperature=0.5)
    out = sane_loss(pred, pred * 0.5, zi, zj, target, target, mask, cfg, layer)
    assert set(out) == {"loss", "loss_recon", "loss_contrast", "rsq"}
    m2 = torch.cat([mask, mask])
    recon = reconstruction_loss(torch.cat([pred, pred * 0.5]), torch.cat([target, target]), m2, "batch", EPS)
    contrast = nt_xent(zi, zj, 0.5)
    assert out["loss_recon"].item() == pytest.approx(recon.item(), rel=1e-6)
    assert out["loss_contrast"].item() == pytest.approx(contrast.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.25 * contrast.item() + 0.75 * recon.item(), rel=1e-6)
    cfg.gamma = 0.0
    assert sane_loss(pred, pred, zi, zj, target, target, mask, cfg)["loss"].item() == pytest.approx(
        sane_loss(pred, pred, zi, zj, target, target, mask, cfg)["loss_recon"].item())


def test_r_squared_counts_valid_entries_only():
    pred, target, mask, _ = _batch(5)
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()
    ss_res = sum((p[i] - t[i]) ** 2 for i in zip(*np.nonzero(m)))
    mean = t[m].mean()
    ss_tot = sum((t[i] - mean) ** 2 for i in zip(*np.nonzero(m)))
    assert r_squared(pred, target, mask).item() == pytest.approx(1 - ss_res / ss_tot, rel=1e-10)
    padded_pred = torch.where(mask, pred, 123.0)
    assert r_squared(padded_pred, target, mask).item() == pytest.approx(1 - ss_res / ss_tot, rel=1e-10)
