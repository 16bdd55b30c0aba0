"""Masked loss normalization and NT-Xent against independent hand computations (numpy loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mzsane.config import LossConfig
from mzsane.errors import ConfigError
from mzsane.model.losses import normalization_scale, nt_xent, r_squared, reconstruction_loss, sane_loss

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
    """Loops over entries; the statistic of a token is the first usable (>= min_valid values, std >= eps) of:
    token mode: the token, else per entry the same column of its layer in its sample, over the batch, then its
    layer in its sample, its layer over the batch, the batch; layer mode: the layer chain alone; token_unmasked:
    the token over all D entries (padding included), else the batch."""
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()
    B, T, D = p.shape
    vals = [t[b, i, d] for b in range(B) for i in range(T) for d in range(D) if m[b, i, d]]
    batch_std = float(np.std(vals))
    groups: dict = {}
    for b in range(B):
        for i in range(T):
            entries = [t[b, i, d] for d in range(D) if m[b, i, d]]
            for key in (("token", b, i), ("sample_layer", b, int(layer[b, i])), ("layer", int(layer[b, i]))):
                groups.setdefault(key, []).extend(entries)
            for d in range(D):  # the same entry across the layer's tokens (token mode's per-entry fallback)
                if m[b, i, d]:
                    groups.setdefault(("sample_layer_col", b, int(layer[b, i]), d), []).append(t[b, i, d])
                    groups.setdefault(("layer_col", int(layer[b, i]), d), []).append(t[b, i, d])

    def usable(values):
        return len(values) >= min_valid and float(np.std(values)) >= EPS

    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mode == "none":
                s = 1.0
            elif mode == "batch":
                s = batch_std + EPS
            elif mode == "token_unmasked":
                std = float(np.std(t[b, i]))
                s = (batch_std if std < EPS else std) + EPS
            else:
                chain = [("sample_layer", b, int(layer[b, i])), ("layer", int(layer[b, i]))]
                if mode == "token":
                    chain.insert(0, ("token", b, i))
                first = next((groups[k] for k in chain if usable(groups[k])), None)
                s = (float(np.std(first)) if first is not None else batch_std) + EPS
            for d in range(D):
                if m[b, i, d]:
                    s_d = s
                    if mode == "token" and not usable(groups[("token", b, i)]):
                        entry_chain = [("sample_layer_col", b, int(layer[b, i]), d),
                                       ("layer_col", int(layer[b, i]), d), *chain[1:]]
                        first = next((groups[k] for k in entry_chain if usable(groups[k])), None)
                        s_d = (float(np.std(first)) if first is not None else batch_std) + EPS
                    total += ((p[b, i, d] - t[b, i, d]) / s_d) ** 2
                    count += 1
    return total / count


@pytest.mark.parametrize("mode", ["none", "batch", "token", "token_unmasked", "layer"])
def test_each_mode_matches_a_hand_computation(mode):
    pred, target, mask, layer = _batch()
    target = torch.where(mask, target, 0.0)  # padding is zero in real tokens (token_unmasked counts it)
    got = reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer, min_valid_per_token=3)
    assert got.item() == pytest.approx(_hand_loss(pred, target, mask, mode, layer), rel=1e-10)


def _conv_and_bn_batch(B=4, T=6, D=8):
    """Layer 0: conv-like tokens (8 valid values, std ~0.05); layer 1: BN tokens (weight ~1, bias ~0: 2 valid
    values each), as in a ResNet; the batch std is dominated by the BN layer's spread."""
    g = torch.Generator().manual_seed(11)
    target = torch.zeros(B, T, D, dtype=torch.float64)
    mask = torch.zeros(B, T, D, dtype=torch.bool)
    layer = torch.zeros(B, T, dtype=torch.long)
    target[:, :3] = 0.05 * torch.randn(B, 3, D, generator=g, dtype=torch.float64)
    mask[:, :3] = True
    layer[:, 3:] = 1
    target[:, 3:, 0] = 1 + 0.1 * torch.randn(B, T - 3, generator=g, dtype=torch.float64)
    target[:, 3:, 1] = 0.02 * torch.randn(B, T - 3, generator=g, dtype=torch.float64)
    mask[:, 3:, :2] = True
    return target, mask, layer


def test_bn_tokens_get_per_entry_statistics_of_their_layer_not_the_batchs():
    """A BN token's weight is measured against the other channels' weights, its bias against their biases: the
    pooled statistic of both (weight ~1, bias ~0) is the offset between them (~0.5), 5-25x the real spread."""
    target, mask, layer = _conv_and_bn_batch()
    scale = normalization_scale(target, mask, "token", EPS, layer_BT=layer, min_valid_per_token=3)
    assert scale.shape == target.shape
    for b in range(target.shape[0]):
        for d in (0, 1):  # weight column, bias column: own layer, own sample, 3 values each
            expected = target[b, 3:, d].std(unbiased=False) + EPS
            assert torch.allclose(scale[b, 3:, d], expected.expand(3), rtol=1e-12)
        pooled = target[b, 3:, :2].reshape(-1).std(unbiased=False)
        assert (scale[b, 3:, :2] < pooled / 4).all()  # not the pooled (layer) statistic
        for i in range(3):  # conv tokens: their own statistics, for every entry
            own = target[b, i].std(unbiased=False).item() + EPS
            assert torch.allclose(scale[b, i], torch.full((target.shape[-1],), own, dtype=scale.dtype), rtol=1e-12)
    batch_std = target[mask].std(unbiased=False)
    assert not torch.allclose(scale[:, 3:, :2], batch_std + EPS)


def test_layer_mode_keeps_the_pooled_layer_statistic_for_bn_tokens():
    target, mask, layer = _conv_and_bn_batch()
    scale = normalization_scale(target, mask, "layer", EPS, layer_BT=layer, min_valid_per_token=3)
    for b in range(target.shape[0]):
        expected = target[b, 3:, :2].reshape(-1).std(unbiased=False) + EPS  # own layer, own sample: 6 values
        assert torch.allclose(scale[b, 3:], expected.expand(3), rtol=1e-12)


def test_a_layer_too_small_in_its_sample_uses_the_same_entry_over_the_batch():
    target, mask, layer = _conv_and_bn_batch(T=4)  # one BN token per sample: 1 value per column < 3
    scale = normalization_scale(target, mask, "token", EPS, layer_BT=layer, min_valid_per_token=3)
    for d in (0, 1):
        expected = target[:, 3, d].std(unbiased=False) + EPS  # BN column over the 4 samples
        assert torch.allclose(scale[:, 3, d], expected.expand(4), rtol=1e-12)


def test_unmasked_token_mode_counts_the_padding():
    target, mask, layer = _conv_and_bn_batch()
    masked = normalization_scale(target, mask, "token", EPS, layer_BT=layer)
    unmasked = normalization_scale(target, mask, "token_unmasked", EPS, layer_BT=layer)
    assert torch.allclose(unmasked[0, 3], target[0, 3].std(unbiased=False) + EPS)  # 2 values among 6 zeros
    assert torch.allclose(unmasked[:, :3, None].expand_as(masked[:, :3]), masked[:, :3])  # full tokens: the same
    assert not torch.allclose(unmasked[:, 3:, None].expand_as(masked[:, 3:]), masked[:, 3:])


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

        def gather(x, full_i=zi, full_j=zj, li=li, rank=rank):
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


def test_token_reduction_weighs_every_token_the_same_however_short():
    """``reduction=token``: the mean over tokens of each token's mean over its valid entries, so a BN token's 2
    entries weigh as much as a conv token's 288 (``entry`` weighs them 2:288)."""
    pred, target, mask, layer = _batch(4)
    for mode in ("none", "token", "layer"):
        scale = normalization_scale(target, mask, mode, EPS, layer_BT=layer)
        scale = scale[..., None] if scale.dim() == 2 else scale
        sq = torch.where(mask, (pred - target) / scale, 0.0) ** 2
        per_token = [sq[b, t][mask[b, t]].mean().item() for b in range(sq.shape[0]) for t in range(sq.shape[1])
                     if mask[b, t].any()]
        got = reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer, reduction="token")
        assert got.item() == pytest.approx(float(np.mean(per_token)), rel=1e-12)
        assert got.item() != pytest.approx(reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer).item())
    # padding still never reaches value or gradient
    p = torch.where(mask, pred, 1e6).requires_grad_()
    reconstruction_loss(p, torch.where(mask, target, -1e6), mask, "token", EPS, layer_BT=layer,
                        reduction="token").backward()
    assert (p.grad[~mask] == 0).all() and torch.isfinite(p.grad).all()
    with pytest.raises(ConfigError, match="reduction"):
        reconstruction_loss(pred, target, mask, "token", EPS, layer_BT=layer, reduction="rows")


def _per_entry_sq(pred, target, mask, mode, layer):
    scale = normalization_scale(target, mask, mode, EPS, layer_BT=layer)
    scale = scale[..., None] if scale.dim() == 2 else scale
    return torch.where(mask, (pred - target) / scale, 0.0) ** 2


@pytest.mark.parametrize("mode", ["none", "batch", "token", "layer"])
def test_token_power_at_alpha_0_and_1_is_the_token_and_entry_reductions(mode):
    """Token weight n^alpha: alpha 0 weighs every token the same (``token``), alpha 1 weighs a token by its valid
    entries, which is the plain mean over entries (``entry``)."""
    pred, target, mask, layer = _batch(5)
    for alpha, same_as in ((0.0, "token"), (1.0, "entry")):
        got = reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer, reduction="token_power",
                                  token_weight_alpha=alpha)
        want = reconstruction_loss(pred, target, mask, mode, EPS, layer_BT=layer, reduction=same_as)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.75])
def test_token_power_matches_a_hand_computation(alpha):
    pred, target, mask, layer = _batch(6)
    sq = _per_entry_sq(pred, target, mask, "token", layer).numpy()
    m = mask.numpy()
    num, den = 0.0, 0.0
    for b in range(sq.shape[0]):
        for t in range(sq.shape[1]):
            n = int(m[b, t].sum())
            if n:
                num += n ** alpha * sq[b, t][m[b, t]].mean()
                den += n ** alpha
    got = reconstruction_loss(pred, target, mask, "token", EPS, layer_BT=layer, reduction="token_power",
                              token_weight_alpha=alpha)
    assert got.item() == pytest.approx(num / den, rel=1e-12)
    # strictly between the two ends here (tokens of different lengths and errors)
    ends = sorted(reconstruction_loss(pred, target, mask, "token", EPS, layer_BT=layer, reduction=r).item()
                  for r in ("token", "entry"))
    assert ends[0] < got.item() < ends[1]


def test_layer_reduction_weighs_every_layer_of_a_sample_the_same():
    """Mean over (sample, layer) groups present of each group's mean over its valid entries."""
    pred, target, mask, layer = _batch(7)
    sq = _per_entry_sq(pred, target, mask, "token", layer).numpy()
    m, lay = mask.numpy(), layer.numpy()
    groups: dict = {}
    for b in range(sq.shape[0]):
        for t in range(sq.shape[1]):
            groups.setdefault((b, int(lay[b, t])), []).extend(sq[b, t][m[b, t]].tolist())
    want = float(np.mean([np.mean(v) for v in groups.values() if v]))
    got = reconstruction_loss(pred, target, mask, "token", EPS, layer_BT=layer, reduction="layer")
    assert got.item() == pytest.approx(want, rel=1e-12)
    # a layer cut into twice as many tokens keeps its weight: duplicate every token of the window (same layers)
    twice = reconstruction_loss(torch.cat([pred, pred], 1), torch.cat([target, target], 1),
                                torch.cat([mask, mask], 1), "batch", EPS, layer_BT=torch.cat([layer, layer], 1),
                                reduction="layer")
    once = reconstruction_loss(pred, target, mask, "batch", EPS, layer_BT=layer, reduction="layer")
    assert twice.item() == pytest.approx(once.item(), rel=1e-12)
    with pytest.raises(ConfigError, match="layer index"):
        reconstruction_loss(pred, target, mask, "batch", EPS, reduction="layer")


@pytest.mark.parametrize("reduction", ["token_power", "layer"])
def test_new_reductions_never_see_padding(reduction):
    pred, target, mask, layer = _batch(8)
    p = torch.where(mask, pred, 1e6).requires_grad_()
    loss = reconstruction_loss(p, torch.where(mask, target, -1e6), mask, "token", EPS, layer_BT=layer,
                               reduction=reduction, token_weight_alpha=0.5)
    loss.backward()
    clean = reconstruction_loss(pred, target, mask, "token", EPS, layer_BT=layer, reduction=reduction,
                                token_weight_alpha=0.5)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-10)
    assert (p.grad[~mask] == 0).all() and torch.isfinite(p.grad).all()


def test_sane_loss_passes_the_weighting_exponent():
    g = torch.Generator().manual_seed(3)
    pred, target, mask, layer = _batch(9)
    zp = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = {a: sane_loss(pred, pred, zp, zp, target, target, mask,
                        LossConfig(norm_mode="batch", reduction="token_power", token_weight_alpha=a, gamma=0.0),
                        layer_BT=layer)["loss_recon"].item() for a in (0.0, 1.0)}
    assert out[0.0] != pytest.approx(out[1.0])
