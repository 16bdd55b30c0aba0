"""Haloing: every token is produced exactly once, by the chunk the reference's rules assign to it."""
from __future__ import annotations

import pytest
import torch

from mzsane.errors import ConfigError
from mzsane.model import halo


def _positions(n: int) -> torch.Tensor:
    return torch.stack([torch.arange(n), torch.arange(n) // 7, torch.arange(n) % 7], dim=1).int()


def _context_fn(calls: list[int]):
    """Output depends on the token, its global position and the chunk's first global position."""

    def fn(x_BTX, positions_BTP, valid_BT):
        assert valid_BT.all()
        calls.append(x_BTX.shape[0])
        first_B1 = positions_BTP[:, :1, 0].float()
        first_BT1 = first_B1[:, :, None].expand(-1, x_BTX.shape[1], 1)
        return torch.cat([x_BTX * 2 + positions_BTP[..., :1].float(), first_BT1], -1)

    return fn


def _expected_chunk_start(i: int, n: int, w: int, h: int) -> int:
    """The reference's rules, written out literally (spec 2.3)."""
    c = min(w + 2 * h, n)
    k = -(-n // w)
    if i == 0:
        return 0
    if i == k - 1:
        return n - c
    return min(i * w - h, n - c)


SMALL = [(1, 4, 2), (3, 4, 2), (4, 4, 2), (7, 4, 2), (8, 4, 1), (9, 4, 0), (37, 5, 3), (100, 12, 2), (50, 64, 12)]


# every small case with every batch size; ResNet-18's 43,924 tokens with a large batch only (speed)
CASES = [(*case, b) for case in SMALL for b in (1, 3, 64)] + [(43924, 128, 12, 64)]


@pytest.mark.parametrize("n,w,h,batch_size", CASES)
def test_each_position_processed_once_by_its_chunk(n, w, h, batch_size):
    p = halo.plan(n, w, h)
    assert p.content_KT.sum(0).sum() == n
    counts = torch.zeros(n, dtype=torch.long).index_add_(0, p.index_KT[p.content_KT], torch.ones(n, dtype=torch.long))
    assert torch.equal(counts, torch.ones(n, dtype=torch.long))  # exactly once
    assert p.chunk_len == min(w + 2 * h, n)
    m = 3
    x_MNX = torch.randn(m, n, 2)
    calls: list[int] = []
    y = halo.halo_apply(_context_fn(calls), x_MNX, _positions(n), p, batch_size)
    assert y.shape == (m, n, 3)
    assert torch.allclose(y[..., :2], x_MNX * 2 + torch.arange(n).float()[None, :, None])
    # each token came from the chunk the reference's rules give it
    chunk_of_token = torch.arange(n) // w
    starts = torch.tensor([_expected_chunk_start(int(i), n, w, h) for i in chunk_of_token]).float()
    assert torch.equal(y[..., 2], starts[None].expand(m, n))
    assert max(calls) <= batch_size and sum(calls) == m * p.num_chunks


def test_reference_resnet18_numbers():
    p = halo.plan(43924, 128, 12)
    assert p.num_chunks == 344 and p.chunk_len == 152
    assert int(p.content_KT[-1].sum()) == 20  # last chunk holds N mod 128 content tokens
    assert int(p.index_KT[5, 0]) == 5 * 128 - 12  # middle chunk i starts at i*w - h
    assert p.content_KT[5, 12:140].all() and not p.content_KT[5, :12].any()


def test_haloify_dehaloify_roundtrip():
    p = halo.plan(53, 8, 3)
    x = torch.randn(4, 53, 5)
    chunks = halo.haloify(x, p)
    assert chunks.shape == (4 * p.num_chunks, 14, 5)
    assert torch.equal(halo.dehaloify(chunks, p, 4), x)


class _Scale(torch.nn.Module):
    """Identity-like stand-in backbone: z = 3x at encode, x = z/3 at decode."""

    def encode(self, tokens_BTD, positions_BTP, valid_BT):
        return tokens_BTD[..., :4] * 3

    def decode(self, z_BTL, positions_BTP, valid_BT):
        return torch.cat([z_BTL / 3, torch.zeros(*z_BTL.shape[:2], 2)], -1)


def test_encode_decode_with_stand_in_backbone():
    n = 29
    p = halo.plan(n, 6, 2)
    tokens = torch.randn(2, n, 6)
    tokens[..., 4:] = 0
    z = halo.encode(_Scale(), tokens, _positions(n), p, batch_size=5)
    assert z.shape == (2, n, 4)
    assert torch.allclose(halo.decode(_Scale(), z, _positions(n), p, batch_size=7), tokens)


def test_invalid_settings_raise_config_error():
    with pytest.raises(ConfigError):
        halo.plan(10, 0, 2)
    with pytest.raises(ConfigError):
        halo.plan(10, 4, -1)
