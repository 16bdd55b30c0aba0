"""Latent sampling around anchors: seeded, per-token noise, batch-size independent, relative bandwidth."""
from __future__ import annotations

import pytest
import torch

from mzsane.errors import ConfigError
from mzsane.sample.latent import anchor_spread, sample_latents


def _anchors(k=4, n=50, l=6, seed=0):
    return torch.randn(k, n, l, generator=torch.Generator().manual_seed(seed)) * 3


def test_token_mode_one_anchor_per_sample_and_noise_per_token():
    anchors = _anchors()
    z, pick = sample_latents(anchors, range(64), "token", bandwidth=0.2, seed=1)
    assert z.shape == (64, 50, 6)
    assert (pick == pick[:, :1]).all()  # one anchor per candidate
    noise = z - anchors[pick[:, 0]]
    # noise differs between tokens (the reference's shared-across-tokens noise is fixed)
    assert not torch.allclose(noise[:, 0], noise[:, 1])
    assert abs(noise.std().item() - 0.2) < 0.01
    assert abs(noise.mean().item()) < 0.01
    # every anchor gets used
    assert set(pick[:, 0].tolist()) == set(range(4))


def test_seeded_and_independent_of_batching():
    anchors = _anchors()
    z_all, _ = sample_latents(anchors, range(10), "token", 0.5, seed=3)
    z_a, _ = sample_latents(anchors, range(4), "token", 0.5, seed=3)
    z_b, _ = sample_latents(anchors, range(4, 10), "token", 0.5, seed=3)
    assert torch.equal(z_all, torch.cat([z_a, z_b]))
    z_other, _ = sample_latents(anchors, range(10), "token", 0.5, seed=4)
    assert not torch.allclose(z_all, z_other)


def test_token_independent_bandwidth_is_relative_to_spread():
    anchors = _anchors(k=5, n=40)
    anchors[:, :20] = anchors[0:1, :20]  # anchors agree on the first 20 tokens
    anchors[:, 20:] *= 10
    sigma = anchor_spread(anchors)
    assert torch.all(sigma[:20] == 0) and torch.all(sigma[20:] > 0)
    z, pick = sample_latents(anchors, range(200), "token_independent", 0.5, seed=0)
    assert (pick == pick[:, :1]).all()  # one coherent anchor per candidate
    noise = z - anchors[pick, torch.arange(40)]
    assert torch.all(noise[:, :20] == 0)
    assert not torch.allclose(noise[:, 20], noise[:, 21])  # independent per token
    ratio = noise[:, 20:].std(dim=(0, 2)) / sigma[20:]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), atol=0.08)


def test_zero_bandwidth_returns_anchors():
    anchors = _anchors()
    z, pick = sample_latents(anchors, range(5), "token", 0.0, seed=0)
    assert torch.equal(z, anchors[pick[:, 0]])


def test_bad_inputs():
    with pytest.raises(ConfigError):
        sample_latents(_anchors(), range(2), "joint", 0.2, seed=0)
    with pytest.raises(ConfigError):
        sample_latents(_anchors(k=1), range(2), "token_independent", 0.2, seed=0)
    with pytest.raises(ConfigError):
        sample_latents(_anchors(), range(2), "token", -1.0, seed=0)
