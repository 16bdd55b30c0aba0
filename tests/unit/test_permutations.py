"""Permutations preserve the network's function and are applied exactly in token space."""
import itertools

import pytest
import torch

from mzsane.errors import DataError
from mzsane.tokens.alignment import align
from mzsane.tokens.permutations import Permuter
from mzsane.tokens.symmetries import permute_tensor, resnet_spec
from mzsane.tokens.tokenize import layout_from_state_dict, tokenize
from mzsane.zoo.architectures import ARCHITECTURES, build_model

CASES = {  # arch -> build kwargs (small inputs keep the forward passes fast)
    "cnn_s": {"dropout": 0.5},
    "cnn_l": {},
    "resnet18": {"channels_in": 1, "num_classes": 7},
    "resnet18_gray": {"num_classes": 7},
    "resnet_mini": {},
    "mlp": {"width": 12, "depth": 3},
}
assert set(CASES) == set(ARCHITECTURES), "every registered architecture needs a permutation case"


def _model(arch, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, **CASES[arch]).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():  # non-trivial BN statistics
            if name.endswith("running_mean"):
                buf.normal_(0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    return model


def _input(arch, model):
    defaults = ARCHITECTURES[arch].defaults
    channels = CASES[arch].get("channels_in", defaults["channels_in"])
    size = 16 if arch.startswith("resnet18") else defaults["image_size"]
    return torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("stats", [False, True])
def test_permuted_network_computes_the_same_function(arch, stats):
    model = _model(arch)
    sd = model.state_dict()
    layout = layout_from_state_dict(sd, 288, include_running_stats=stats)
    permuter = Permuter(arch, layout)
    perms = permuter.random_perms(torch.Generator().manual_seed(7))
    assert not permuter.is_identity(perms)
    permuted_sd = permuter.permute_state_dict(sd, perms)
    other = build_model(arch, **CASES[arch]).eval()
    other.load_state_dict(permuted_sd)
    x = _input(arch, model)
    with torch.no_grad():
        expected, got = model(x), other(x)
    assert torch.allclose(expected, got, atol=1e-5, rtol=1e-4)
    changed = [k for k in sd if not torch.equal(sd[k], permuted_sd[k])]
    assert len(changed) > len(sd) // 2  # the draw really moved weights


# ResNet-18 (43,924 tokens) takes 4-12 s per case: slow; resnet_mini keeps the ResNet family in the fast run
ARCHS_RESNET18_SLOW = [pytest.param(a, marks=pytest.mark.slow) if a == "resnet18" else a for a in sorted(CASES)]


@pytest.mark.parametrize("arch", ARCHS_RESNET18_SLOW)
@pytest.mark.parametrize("include_bn,stats", [(True, False), (True, True), (False, False)])
def test_token_space_equals_permuting_the_checkpoint(arch, include_bn, stats):
    sd = _model(arch, seed=2).state_dict()
    tokensize = 288 if arch != "mlp" else 5
    layout = layout_from_state_dict(sd, tokensize, include_bn=include_bn, include_running_stats=stats)
    permuter = Permuter(arch, layout)
    tokens_ND = tokenize(sd, layout)
    perms = [permuter.random_perms(torch.Generator().manual_seed(s)) for s in (3, 4)]
    index = permuter.index_from_perms(perms)
    assert index.shape == (2, layout.num_tokens * layout.tokensize)
    out = Permuter.apply(tokens_ND, index)
    for b in range(2):
        direct = tokenize(permuter.permute_state_dict(sd, perms[b]), layout)
        assert torch.equal(out[b], direct)
        assert torch.count_nonzero(out[b][~layout.mask_ND]) == 0
    ids = torch.tensor([0, layout.num_tokens // 2, layout.num_tokens - 1])
    window = Permuter.apply(tokens_ND, permuter.index_from_perms(perms, ids))
    assert torch.equal(window, out[:, ids])


def test_padding_reads_the_sentinel_not_element_zero():
    sd = _model("cnn_l").state_dict()
    layout = layout_from_state_dict(sd, 288)
    permuter = Permuter("cnn_l", layout)
    index = permuter.sample_index(torch.Generator().manual_seed(0), num=3)
    sentinel = layout.num_tokens * layout.tokensize
    pad = ~layout.mask_ND.reshape(-1)
    assert bool((index[:, pad] == sentinel).all()) and bool((index[:, ~pad] < sentinel).all())
    tokens = tokenize(sd, layout) + 1.0  # padding no longer zero in the source, must still come out zero
    tokens[~layout.mask_ND] = 0
    tokens_BND = tokens.expand(3, -1, -1)
    out = Permuter.apply(tokens_BND, index)
    assert torch.count_nonzero(out[:, ~layout.mask_ND]) == 0
    assert torch.all(out[:, layout.mask_ND] != 0)


def test_same_seed_same_draw_and_identity_avoidance():
    sd = build_model("mlp", width=2, depth=1).state_dict()  # a single group of size 2: identity is 50%
    permuter = Permuter("mlp", layout_from_state_dict(sd, 8))
    a = permuter.sample_index(torch.Generator().manual_seed(5), num=4)
    b = permuter.sample_index(torch.Generator().manual_seed(5), num=4)
    assert torch.equal(a, b)
    identity = permuter.index_from_perms([permuter.identity_perms()])
    g = torch.Generator().manual_seed(0)
    draws = permuter.sample_index(g, num=20, avoid_identity=True)
    assert not any(torch.equal(row, identity[0]) for row in draws)
    fixed = Permuter("mlp", layout_from_state_dict(build_model("mlp", width=1, depth=1).state_dict(), 8))
    assert not fixed.can_permute and fixed.sample_index(g, 1, avoid_identity=True).shape[0] == 1


def test_resnet_spec_shares_stream_per_stage():
    spec = resnet_spec({k: tuple(v.shape) for k, v in build_model("resnet18").state_dict().items()})
    assert spec.axes["conv1.weight"] == ("stream1", None)
    assert spec.axes["layer1.1.conv2.weight"] == ("stream1", "inner1.1")
    assert spec.axes["layer2.0.conv1.weight"] == ("inner2.0", "stream1")
    assert spec.axes["layer2.0.downsample.0.weight"] == ("stream2", "stream1")
    assert spec.axes["layer2.0.downsample.1.running_var"] == ("stream2",)
    assert spec.axes["fc.weight"] == (None, "stream4") and "fc.bias" not in spec.axes
    assert "bn1.num_batches_tracked" not in spec.axes
    assert len(spec.sizes) == 4 + 8


def _agreement(ref, other, spec, group, perm) -> float:
    """Weight matching's objective: sum of <reference, permuted other> over the permuted tensors."""
    return sum(float((ref[k].double() * permute_tensor(other[k].double(), spec.axes[k], {group: perm})).sum())
               for k in spec.axes)


def test_weight_matching_finds_the_best_permutation_of_one_hidden_layer():
    """One hidden group: the matching must be the brute-force best of all 6! permutations."""
    from mzsane.tokens.alignment import match_weights
    from mzsane.tokens.symmetries import spec_builder

    for seed in range(4):
        ref = build_model("mlp", width=6, depth=1, image_size=4).state_dict()
        torch.manual_seed(100 + seed)
        other = build_model("mlp", width=6, depth=1, image_size=4).state_dict()
        spec = spec_builder("mlp")({k: tuple(v.shape) for k, v in other.items()})
        (group,) = spec.sizes
        best = max(_agreement(ref, other, spec, group, torch.tensor(p)) for p in itertools.permutations(range(6)))
        found = match_weights(other, ref, spec)[group]
        assert sorted(found.tolist()) == list(range(6))
        assert _agreement(ref, other, spec, group, found) == pytest.approx(best)


@pytest.mark.parametrize("arch", ["cnn_s", "resnet_mini"])
def test_align_recovers_a_known_permutation(arch):
    sd = _model(arch, seed=3).state_dict()
    permuter = Permuter(arch, layout_from_state_dict(sd, 288))
    scrambled = permuter.permute_state_dict(sd, permuter.random_perms(torch.Generator().manual_seed(9)))
    assert not all(torch.equal(scrambled[k], sd[k]) for k in sd)
    aligned = align(scrambled, sd, arch)
    assert all(torch.equal(aligned[k], sd[k]) for k in sd)
    assert all(torch.equal(a, b) for a, b in zip(permuter.align(scrambled, sd).values(), sd.values()))


def test_spec_that_does_not_fit_the_layout_is_a_data_error():
    cnn = layout_from_state_dict(build_model("cnn_s").state_dict(), 288)
    resnet = layout_from_state_dict(build_model("resnet_mini").state_dict(), 288)
    with pytest.raises(DataError, match="ResNet"):
        Permuter("resnet_mini", cnn)
    with pytest.raises(DataError, match="chain"):
        Permuter("cnn_s", resnet)
    with pytest.raises(DataError, match="architecture"):
        Permuter("vgg", cnn)
