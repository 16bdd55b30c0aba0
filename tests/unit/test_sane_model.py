"""SANE autoencoder: shapes, padding invariance, the length-free head, init, errors, determinism, overfitting."""
from __future__ import annotations

import math

import pytest
import torch

from mzsane import presets
from mzsane.config import AugmentConfig, LossConfig, ModelConfig
from mzsane.errors import DataError
from mzsane.model.augment import Augmenter
from mzsane.model.losses import sane_loss
from mzsane.model.sane import SANE


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP barriers make them 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CFG = ModelConfig(d_model=32, num_heads=2, num_layers=2, latent_dim=8, projection_dim=8)
D, MAXPOS = 12, [40, 6, 10]


def _inputs(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, T, D, generator=g)
    pos = torch.stack([torch.randint(0, m, (B, T), generator=g) for m in MAXPOS], -1)
    return tokens, pos


def test_shapes_and_latent_width():
    model = SANE(CFG, D, MAXPOS)
    tokens, pos = _inputs()
    z, zp, recon = model(tokens, pos, torch.ones(3, 7, dtype=torch.bool))
    assert z.shape == (3, 7, 8) and zp.shape == (3, 8) and recon.shape == (3, 7, D)
    assert torch.equal(model.decode(z, pos), model(tokens, pos)[2])


def test_padded_tokens_are_ignored_and_head_works_for_any_length():
    """Valid tokens of a padded window give exactly what the unpadded shorter window gives."""
    model = SANE(CFG, D, MAXPOS).eval()
    tokens, pos = _inputs(B=2, T=9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False
    z, zp, recon = model(tokens, pos, valid)
    z_short, zp_short, recon_short = model(tokens[1:, :5], pos[1:, :5])
    assert torch.allclose(z[1, :5], z_short[0], atol=1e-5)
    assert torch.allclose(zp[1], zp_short[0], atol=1e-5)
    assert torch.allclose(recon[1, :5], recon_short[0], atol=1e-5)
    # changing what sits in the padding changes nothing for the valid tokens
    junk = tokens.clone()
    junk[1, 5:] = 1e3 * torch.randn(4, D)
    z2, zp2, recon2 = model(junk, pos, valid)
    assert torch.equal(z2[0], z[0]) and torch.allclose(z2[1, :5], z[1, :5], atol=1e-6)
    assert torch.allclose(zp2, zp, atol=1e-6) and torch.allclose(recon2[1, :5], recon[1, :5], atol=1e-6)
    # the head takes windows of different lengths (the reference's flatten head could not)
    for T in (1, 4, 16):
        assert model.project(torch.randn(3, T, 8)).shape == (3, 8)


def test_padding_values_do_not_change_loss_or_gradients():
    model = SANE(CFG, D, MAXPOS)
    tokens, pos = _inputs(B=4, T=6)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[2, 3:] = False
    mask = valid[..., None].expand(-1, -1, D).clone()
    results = []
    for fill in (0.0, 50.0):
        x = torch.where(mask, tokens, fill)
        model.zero_grad()
        _, zp, recon = model(x, pos, valid)
        out = sane_loss(recon[:2], recon[2:], zp[:2], zp[2:], x[:2], x[2:], mask[:2] & mask[2:],
                        LossConfig(gamma=0.5, norm_mode="token"), pos[:2, :, 1])
        out["loss"].backward()
        results.append((out["loss"].item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for g0, g1 in zip(results[0][1], results[1][1]):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-7)


def test_positions_beyond_the_tables_raise_a_clear_error():
    model = SANE(CFG, D, MAXPOS)
    tokens, pos = _inputs()
    pos[0, 0, 2] = MAXPOS[2]
    with pytest.raises(DataError, match=r"row position 10 exceeds .* size 10"):
        model(tokens, pos)
    with pytest.raises(DataError, match="tokensize"):
        model(torch.zeros(1, 2, D + 1), torch.zeros(1, 2, 3, dtype=torch.long))


def test_init_follows_the_reference():
    model = SANE(ModelConfig(d_model=256, num_heads=4, num_layers=8, latent_dim=16), D, [4000, 6, 10])
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert std(model.encoder[0].qkv.weight) == pytest.approx(0.02, rel=0.02)
    assert std(model.decoder[3].mlp_proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.03)
    assert std(model.position.token.weight) == pytest.approx(0.02, rel=0.03)
    assert (model.tokenizer.bias == 0).all()
    other = SANE(ModelConfig(d_model=256, num_heads=4, num_layers=8, latent_dim=16), D, [4000, 6, 10])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def _mixed_batch(window=16):
    """Tokens of cnn_s nets and two mlps (tokensize 64), one shorter than the window (padded)."""
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.permutations import Permuter
    from mzsane.tokens.tokenize import tokenize
    from mzsane.zoo.architectures import build_model

    layouts, permuters, samples = {}, {}, []
    for i, (arch, kw) in enumerate([("cnn_s", {}), ("mlp", {"image_size": 4, "width": 8}), ("cnn_s", {}),
                                      ("mlp", {"image_size": 2, "width": 4, "depth": 1})]):
        net = build_model(arch, generator=torch.Generator().manual_seed(i), init="kaiming_uniform", **kw)
        layout = layout_from_state_dict(net.state_dict(), tokensize=64)
        layouts[layout.layout_id], permuters[layout.layout_id] = layout, Permuter(arch, layout)
        samples.append((tokenize(net.state_dict(), layout), layout.layout_id))
    max_positions = [max(lo.max_positions[a] for lo in layouts.values()) for a in range(3)]
    return samples, layouts, permuters, max_positions


def _train(steps, seed, samples, layouts, permuters, max_positions, fixed_views):
    cfg = presets.tiny()
    torch.manual_seed(1234)  # must not matter: everything below takes explicit generators
    model = SANE(cfg.model, 64, max_positions, generator=torch.Generator().manual_seed(seed))
    aug = Augmenter(AugmentConfig(noise_mode="none") if fixed_views else cfg.augment, cfg.data.window_size,
                    permuters, layouts)
    gen = torch.Generator().manual_seed(seed)
    views = aug.make_views(samples, gen)
    loss_cfg = LossConfig(gamma=0.0 if fixed_views else 0.05, norm_mode="batch")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        if not fixed_views:
            views = aug.make_views(samples, gen)
        x = torch.cat([views.view1_BTD, views.view2_BTD])
        pos = torch.cat([views.positions_BTP, views.positions_BTP])
        valid = torch.cat([views.valid_BT, views.valid_BT])
        _, zp, recon = model(x, pos, valid)
        B = len(samples)
        out = sane_loss(recon[:B], recon[B:], zp[:B], zp[B:], views.view1_BTD, views.view2_BTD, views.mask_BTD,
                        loss_cfg, views.layer_BT)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    return history


def test_same_seed_same_loss_bit_for_bit():
    data = _mixed_batch()
    a = _train(4, 7, *data, fixed_views=False)
    b = _train(4, 7, *data, fixed_views=False)
    assert [h["loss"] for h in a] == [h["loss"] for h in b]
    c = _train(4, 8, *data, fixed_views=False)
    assert [h["loss"] for h in a] != [h["loss"] for h in c]


@pytest.mark.slow  # 400 optimizer steps: ~30 s on 2 shared cores
def test_tiny_model_overfits_a_mixed_batch_of_two_architectures():
    data = _mixed_batch()
    assert min(t.shape[0] for t, _ in data[0]) < presets.tiny().data.window_size  # a padded window is in it
    assert len({lid for _, lid in data[0]}) == 3
    history = _train(400, 0, *data, fixed_views=True)
    assert history[-1]["rsq"] > 0.99, history[-1]
