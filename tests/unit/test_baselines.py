"""Baselines and novelty: soups average, alignment undoes permutations, copies show zero novelty."""
from __future__ import annotations

import torch

from mzsane.evaluate import baselines
from mzsane.evaluate.novelty import aligned_distance, novelty, predictions, relative_distance
from mzsane.tokens.layout import layout_from_state_dict
from mzsane.tokens.permutations import Permuter
from mzsane.zoo.architectures import build_model

KW = {"architecture": "cnn_s"}


def _model(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("cnn_s").state_dict()


def _permuted(sd: dict, seed: int) -> dict:
    permuter = Permuter("cnn_s", layout_from_state_dict(sd, tokensize=64))
    return permuter.permute_state_dict(sd, permuter.random_perms(torch.Generator().manual_seed(seed)))


def test_soup_is_the_uniform_average():
    a, b, c = _model(0), _model(1), _model(2)
    s = baselines.soup([a, b, c])
    for k in a:
        assert torch.allclose(s[k], (a[k] + b[k] + c[k]) / 3)


def test_aligned_soup_of_permuted_copies_is_the_model():
    a = _model(0)
    copies = [a, _permuted(a, 1), _permuted(a, 2)]
    x = torch.randn(8, 1, 28, 28)
    net = build_model("cnn_s").eval()
    net.load_state_dict(copies[1])
    ref = build_model("cnn_s").eval()
    ref.load_state_dict(a)
    assert torch.allclose(net(x), ref(x), atol=1e-5)  # a permutation preserves the function
    unaligned = dict(baselines.soup_models(copies, "cnn_s", [3], seed=0, aligned=False))[3]
    aligned = dict(baselines.soup_models(copies, "cnn_s", [3], seed=0, aligned=True))[3]
    assert relative_distance(unaligned, a) > 0.1
    assert relative_distance(aligned, a) < 1e-5


def test_soup_sizes_are_clipped_and_nested():
    pool = [_model(i) for i in range(3)]
    made = baselines.soup_models(pool, "cnn_s", [1, 2, 5], seed=0, aligned=False)
    assert [n for n, _ in made] == [1, 2, 3]
    assert all(torch.equal(made[0][1][k], pool[0][k]) for k in pool[0])


def test_random_models_are_seeded_and_distinct():
    a = baselines.random_models(KW, "kaiming_uniform", 2, seed=3)
    b = baselines.random_models(KW, "kaiming_uniform", 2, seed=3)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert relative_distance(a[0], a[1]) > 0.5
    assert abs(float(a[0]["module_list.0.bias"][0]) - 0.01) < 1e-7  # the zoo's init scheme, not PyTorch's default


def test_order_pool_puts_anchors_first():
    order = baselines.order_pool(["m3", "m1"], ["m0", "m1", "m2", "m3", "m4"], seed=0)
    assert order[:2] == ["m3", "m1"] and sorted(order) == ["m0", "m1", "m2", "m3", "m4"]


def test_novelty_flags_copies_and_permuted_copies():
    anchors = {"a0": _model(0), "a1": _model(1)}
    train = {"t0": _model(10), "t1": _model(11), "t2": _model(12)}
    generated = [_permuted(anchors["a1"], 5), _model(99)]
    x = torch.randn(64, 1, 28, 28)
    out = novelty(KW, generated, anchors, train, x)
    copy, new = out["generated"]
    assert copy["anchor"]["model"] == "a1"
    assert copy["anchor"]["distance"] < 1e-5 and copy["anchor"]["disagreement"] == 0.0
    assert new["anchor"]["distance"] > 0.1
    pairs = out["summary"]["zoo_pair_distance"]
    assert pairs["min"] > 0.1  # independently trained (here: initialized) models are far apart
    assert aligned_distance(generated[0], anchors["a1"], "cnn_s") < relative_distance(generated[0], anchors["a1"])


def test_predictions_shape():
    p = predictions(KW, [_model(0), _model(1)], torch.randn(5, 1, 28, 28), batch_size=2)
    assert p.shape == (2, 5) and p.dtype == torch.long
