"""Two-view augmentation: per-sample windows and permutations, padding, noise, erasing, determinism."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mzsane.config import AugmentConfig
from mzsane.errors import DataError
from mzsane.model.augment import Augmenter, Views

D = 8


@dataclass
class HandLayout:
    """A 2-layer MLP (in -> h -> out), one token per row (row = weights + bias), tokensize D."""

    n_in: int
    h: int
    n_out: int

    @property
    def num_tokens(self) -> int:
        return self.h + self.n_out

    @property
    def mask_ND(self) -> torch.Tensor:
        m = torch.zeros(self.num_tokens, D, dtype=torch.bool)
        m[: self.h, : self.n_in + 1] = True
        m[self.h:, : self.h + 1] = True
        return m

    @property
    def positions_NP(self) -> torch.Tensor:
        n = torch.arange(self.num_tokens)
        layer = (n >= self.h).long()
        row = torch.where(layer == 0, n, n - self.h)
        return torch.stack([n, layer, row], 1).int()

    @property
    def layout_id(self) -> str:
        return f"mlp-{self.n_in}-{self.h}-{self.n_out}"


class HandPermuter:
    """Permutes the hidden neurons: layer-0 rows and layer-1 input columns (bias column fixed)."""

    def __init__(self, layout: HandLayout):
        self.layout = layout

    def index_for(self, perm: torch.Tensor) -> torch.Tensor:
        L, N = self.layout, self.layout.num_tokens
        index = torch.full((N, D), N * D, dtype=torch.long)
        for i in range(L.h):
            for c in range(L.n_in + 1):
                index[i, c] = int(perm[i]) * D + c
        for j in range(L.n_out):
            for c in range(L.h):
                index[L.h + j, c] = (L.h + j) * D + int(perm[c])
            index[L.h + j, L.h] = (L.h + j) * D + L.h
        return index.reshape(-1)

    def sample_index(self, generator: torch.Generator, num: int = 1) -> torch.Tensor:
        return torch.stack([self.index_for(torch.randperm(self.layout.h, generator=generator)) for _ in range(num)])


def _tokens(layout: HandLayout, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(layout.mask_ND, torch.randn(layout.num_tokens, D, generator=g), 0.0)


def _augmenter(layouts, window=6, **cfg) -> Augmenter:
    base = dict(noise_mode="none", noise_view_1=0.0, noise_view_2=0.0)
    base.update(cfg)
    return Augmenter(AugmentConfig(**base), window, {lo.layout_id: HandPermuter(lo) for lo in layouts},
                     {lo.layout_id: lo for lo in layouts})


BIG, SMALL = HandLayout(3, 5, 4), HandLayout(2, 2, 1)  # 9 tokens and 3 tokens (shorter than the window)


def test_windows_padding_and_view1_canonical():
    aug = _augmenter([BIG, SMALL], window=6)
    tb, ts = _tokens(BIG, 0), _tokens(SMALL, 1)
    samples = [(tb, BIG.layout_id), (ts, SMALL.layout_id), (tb, BIG.layout_id)]
    v = aug.make_views(samples, torch.Generator().manual_seed(0))
    assert isinstance(v, Views)
    assert v.view1_BTD.shape == v.view2_BTD.shape == v.mask_BTD.shape == (3, 6, D)
    assert v.positions_BTP.shape == (3, 6, 3) and v.valid_BT.shape == (3, 6)
    # the short model: 3 real tokens, then padding with mask 0, positions 0, values exactly 0
    assert v.valid_BT[1].tolist() == [True] * 3 + [False] * 3
    assert torch.equal(v.view1_BTD[1, :3], ts) and not v.mask_BTD[1, 3:].any()
    assert (v.view1_BTD[1, 3:] == 0).all() and (v.view2_BTD[1, 3:] == 0).all() and (v.positions_BTP[1, 3:] == 0).all()
    # full-length samples: view 1 is a contiguous canonical window; mask and positions match it
    for b in (0, 2):
        start = int(v.positions_BTP[b, 0, 0])
        assert torch.equal(v.view1_BTD[b], tb[start:start + 6])
        assert torch.equal(v.mask_BTD[b], BIG.mask_ND[start:start + 6])
        assert torch.equal(v.positions_BTP[b], BIG.positions_NP[start:start + 6].long())
        assert v.valid_BT[b].all()
    assert (v.view2_BTD[~v.mask_BTD] == 0).all()


def test_view2_is_the_permuted_model_and_never_the_identity():
    layout = HandLayout(2, 2, 3)  # hidden size 2: half of all draws are the identity
    aug = _augmenter([layout], window=layout.num_tokens, avoid_identity=True)
    tokens = _tokens(layout, 3)
    v = aug.make_views([(tokens, layout.layout_id)] * 64, torch.Generator().manual_seed(1))
    swapped = HandPermuter(layout).index_for(torch.tensor([1, 0]))
    expected = torch.cat([tokens.reshape(-1), torch.zeros(1)])[swapped].view_as(tokens)
    for b in range(64):
        assert torch.equal(v.view1_BTD[b], tokens)
        assert torch.equal(v.view2_BTD[b], expected)  # the only non-identity permutation
    aug_any = _augmenter([layout], window=layout.num_tokens, avoid_identity=False)
    v = aug_any.make_views([(tokens, layout.layout_id)] * 64, torch.Generator().manual_seed(1))
    same = [torch.equal(v.view2_BTD[b], tokens) for b in range(64)]
    assert 0 < sum(same) < 64  # per-sample draws, identity allowed


def test_per_sample_windows_and_permutations_differ():
    aug = _augmenter([BIG], window=3)
    tokens = _tokens(BIG, 0)
    v = aug.make_views([(tokens, BIG.layout_id)] * 32, torch.Generator().manual_seed(0))
    starts = set(v.positions_BTP[:, 0, 0].tolist())
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= BIG.num_tokens - 3
    full = _augmenter([BIG], window=BIG.num_tokens).make_views([(tokens, BIG.layout_id)] * 16,
                                                                torch.Generator().manual_seed(0))
    assert len({tuple(full.view2_BTD[b].flatten().tolist()) for b in range(16)}) > 3


def test_noise_keeps_padding_zero_and_has_the_right_scale():
    for mode in ("multiplicative", "additive"):
        aug = _augmenter([BIG, SMALL], window=6, noise_mode=mode, noise_view_1=0.1, noise_view_2=0.3,
                         permute_view_2=False)
        tb = _tokens(BIG, 0)
        samples = [(tb, BIG.layout_id)] * 200 + [(_tokens(SMALL, 1), SMALL.layout_id)] * 8
        v = aug.make_views(samples, torch.Generator().manual_seed(2))
        clean = _augmenter([BIG, SMALL], window=6, permute_view_2=False).make_views(samples,
                                                                                   torch.Generator().manual_seed(2))
        assert torch.equal(v.mask_BTD, clean.mask_BTD)
        assert (v.view1_BTD[~v.mask_BTD] == 0).all() and (v.view2_BTD[~v.mask_BTD] == 0).all()
        m = v.mask_BTD
        for view, sigma in ((v.view1_BTD, 0.1), (v.view2_BTD, 0.3)):
            if mode == "multiplicative":
                eps = (view[m] / clean.view1_BTD[m] - 1) / sigma
            else:
                eps = (view[m] - clean.view1_BTD[m]) / sigma
            assert abs(eps.std().item() - 1) < 0.05 and abs(eps.mean().item()) < 0.05
        assert not torch.equal(v.view1_BTD, v.view2_BTD)  # independent noise per view


def test_erasing_zeroes_rectangles_and_keeps_padding():
    aug = _augmenter([BIG, SMALL], window=6, erase_prob=1.0, permute_view_2=False)
    samples = [(_tokens(BIG, i), BIG.layout_id) for i in range(20)] + [(_tokens(SMALL, 0), SMALL.layout_id)]
    v = aug.make_views(samples, torch.Generator().manual_seed(0))
    clean = _augmenter([BIG, SMALL], window=6, permute_view_2=False).make_views(samples,
                                                                               torch.Generator().manual_seed(0))
    erased = (v.view1_BTD == 0) & (clean.view1_BTD != 0)
    assert erased.any(dim=(1, 2)).float().mean() > 0.8
    assert ((v.view1_BTD == clean.view1_BTD) | erased).all()
    assert (v.view1_BTD[~v.mask_BTD] == 0).all()


def test_same_seed_same_views_and_different_seed_differs():
    aug = _augmenter([BIG, SMALL], window=4, noise_mode="multiplicative", noise_view_1=0.1, noise_view_2=0.1,
                     erase_prob=0.5)
    samples = [(_tokens(BIG, 0), BIG.layout_id), (_tokens(SMALL, 1), SMALL.layout_id)] * 4
    a = aug.make_views(samples, torch.Generator().manual_seed(5))
    b = aug.make_views(samples, torch.Generator().manual_seed(5))
    c = aug.make_views(samples, torch.Generator().manual_seed(6))
    for name in ("view1_BTD", "view2_BTD", "mask_BTD", "positions_BTP", "valid_BT"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.view2_BTD, c.view2_BTD)


def test_errors_name_the_problem():
    aug = _augmenter([BIG], window=4)
    with pytest.raises(DataError, match="layout"):
        aug.make_views([(_tokens(SMALL, 0), SMALL.layout_id)], torch.Generator())
    with pytest.raises(DataError, match="shape"):
        aug.make_views([(torch.zeros(3, D), BIG.layout_id)], torch.Generator())
    no_perm = Augmenter(AugmentConfig(), 4, {}, {BIG.layout_id: BIG})
    with pytest.raises(DataError, match="permuter"):
        no_perm.make_views([(_tokens(BIG, 0), BIG.layout_id)], torch.Generator())


def test_real_permuter_mixed_architectures():
    """cnn_s and mlp tokens in one batch with the tokens package's Permuter (windowed draws)."""
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.permutations import Permuter
    from mzsane.tokens.tokenize import tokenize
    from mzsane.zoo.architectures import build_model

    torch.manual_seed(0)
    nets = {"cnn_s": build_model("cnn_s"), "mlp": build_model("mlp", image_size=4, width=8)}
    layouts, permuters, samples = {}, {}, []
    for arch, net in nets.items():
        layout = layout_from_state_dict(net.state_dict(), tokensize=64)
        layouts[layout.layout_id], permuters[layout.layout_id] = layout, Permuter(arch, layout)
        samples.append((tokenize(net.state_dict(), layout), layout.layout_id))
    window = max(lo.num_tokens for lo in layouts.values())
    aug = Augmenter(AugmentConfig(noise_mode="none"), window, permuters, layouts)
    v = aug.make_views(samples * 3, torch.Generator().manual_seed(0))
    assert v.view1_BTD.shape == (6, window, 64)
    for b, (tokens, layout_id) in enumerate(samples * 3):
        layout = layouts[layout_id]
        n = layout.num_tokens
        assert torch.equal(v.view1_BTD[b, :n], tokens)
        assert not torch.equal(v.view2_BTD[b, :n], tokens)  # avoid_identity
        for layer in range(layout.num_layers):  # a permutation only moves values within a layer
            rows = layout.positions_NP[:, 1] == layer
            assert torch.equal(v.view2_BTD[b, :n][rows].flatten().sort().values, tokens[rows].flatten().sort().values)
    # a windowed draw equals the same draw over the whole model, sliced
    lid = samples[0][1]
    whole = permuters[lid].sample_index(torch.Generator().manual_seed(3), 1)[0].view(-1, 64)
    part = permuters[lid].sample_index(torch.Generator().manual_seed(3), 1, token_ids=torch.arange(5, 9))[0]
    assert torch.equal(whole[5:9].reshape(-1), part)


def test_a_batch_of_short_models_has_no_padding_positions_by_default():
    """A window is never longer than its model: a batch of 3-token models under a 6-token window is 3 long."""
    aug = _augmenter([SMALL], window=6)
    ts = _tokens(SMALL, 1)
    g = torch.Generator().manual_seed(0)
    windows = [aug.cut(ts, SMALL.layout_id, g) for _ in range(4)]
    v = aug.make_views(windows, torch.Generator().manual_seed(0))
    assert v.view1_BTD.shape == v.mask_BTD.shape == (4, 3, D) and v.positions_BTP.shape == (4, 3, 3)
    assert v.valid_BT.all()  # every position holds a token of the model
    assert torch.equal(v.view1_BTD[0], ts)
    assert aug.token_counts(windows) == (12, 12)  # real tokens == positions computed
    # a batch mixing lengths pads only up to its longest window, not to window_size
    tb = _tokens(BIG, 0)
    mixed = _augmenter([BIG, SMALL], window=12)
    v = mixed.make_views([(tb, BIG.layout_id), (ts, SMALL.layout_id)], torch.Generator().manual_seed(0))
    assert v.view1_BTD.shape == (2, 9, D) and v.valid_BT.sum().item() == 9 + 3


def test_pad_to_window_restores_fixed_window_length():
    """The knob (data.pad_windows) gives the old fixed window_size length, padding with mask 0, positions 0."""
    aug = Augmenter(AugmentConfig(noise_mode="none"), 6, {SMALL.layout_id: HandPermuter(SMALL)},
                    {SMALL.layout_id: SMALL}, pad_to_window=True)
    ts = _tokens(SMALL, 1)
    windows = [aug.cut(ts, SMALL.layout_id, torch.Generator().manual_seed(i)) for i in range(2)]
    v = aug.make_views(windows, torch.Generator().manual_seed(0))
    assert v.view1_BTD.shape == (2, 6, D)
    assert v.valid_BT[:, 3:].sum().item() == 0 and not v.mask_BTD[:, 3:].any()
    assert aug.token_counts(windows) == (6, 12)  # 6 real tokens, 12 positions computed


def test_trimmed_and_padded_batches_give_the_same_loss():
    """Dropping the padding changes no number the model or the loss sees (the key padding mask and the masked
    loss already ignored it): same loss within float tolerance, so trimming trains exactly as before."""
    from mzsane.config import LossConfig, ModelConfig
    from mzsane.model.losses import sane_loss
    from mzsane.model.sane import SANE

    ts = _tokens(SMALL, 1)
    windows = [Augmenter(AugmentConfig(noise_mode="none"), 6, {SMALL.layout_id: HandPermuter(SMALL)},
                         {SMALL.layout_id: SMALL}).cut(ts, SMALL.layout_id, torch.Generator().manual_seed(i))
               for i in range(3)]
    model = SANE(ModelConfig(d_model=16, num_heads=2, num_layers=1, latent_dim=4, projection_dim=4), D, [8, 4, 8])
    losses = []
    for pad in (False, True):
        aug = Augmenter(AugmentConfig(noise_mode="none"), 6, {SMALL.layout_id: HandPermuter(SMALL)},
                        {SMALL.layout_id: SMALL}, pad_to_window=pad)
        v = aug.make_views(windows, torch.Generator().manual_seed(0))
        b = v.view1_BTD.shape[0]
        _, zp, recon = model(torch.cat([v.view1_BTD, v.view2_BTD]), torch.cat([v.positions_BTP] * 2),
                             torch.cat([v.valid_BT] * 2))
        terms = sane_loss(recon[:b], recon[b:], zp[:b], zp[b:], v.view1_BTD, v.view2_BTD, v.mask_BTD, LossConfig(),
                          layer_BT=v.positions_BTP[..., 1])
        losses.append(float(terms["loss"].detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
