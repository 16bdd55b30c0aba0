"""Tokenization matches the reference layout (spec 1.4) and inverts bit-exactly."""
import json

import pytest
import torch

from mzsane.errors import DataError
from mzsane.tokens.layout import TokenLayout, layout_from_shapes
from mzsane.tokens.tokenize import detokenize, layout_from_state_dict, tokenize
from mzsane.zoo.architectures import ARCHITECTURES, build_model


def _sd(arch, seed=0, **kw):
    torch.manual_seed(seed)
    sd = build_model(arch, **kw).state_dict()
    for key, value in sd.items():  # non-trivial running stats so copying them is observable
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return sd


@pytest.fixture(scope="module")
def resnet18_sd():
    return _sd("resnet18")


@pytest.mark.parametrize("classes,layers,tokens,valid", [(10, 41, 43_924, 11_173_962), (100, 41, 44_104, None),
                                                          (200, 41, 44_304, None)])
def test_resnet18_counts_match_reference(classes, layers, tokens, valid):
    shapes = {k: tuple(v.shape) for k, v in build_model("resnet18", num_classes=classes).state_dict().items()}
    layout = layout_from_shapes(shapes, 288)
    assert (layout.num_layers, layout.num_tokens) == (layers, tokens)
    if valid:
        assert layout.num_valid == valid
        assert int(layout.mask_ND.sum()) == valid


def test_resnet18_layout_details(resnet18_sd):
    layout = layout_from_state_dict(resnet18_sd, 288)
    by_key = {e.key: e for e in layout.entries}
    assert by_key["conv1.weight"].chunks == 1 and by_key["conv1.weight"].row_len == 27
    assert [by_key[f"layer{s}.1.conv2.weight"].chunks for s in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert by_key["fc.weight"].chunks == 2 and by_key["fc.weight"].row_len == 513
    assert by_key["bn1.weight"].bias_key == "bn1.bias" and by_key["bn1.weight"].row_len == 2
    assert by_key["layer2.0.downsample.0.weight"].chunks == 1
    ignore_bn = layout_from_state_dict(resnet18_sd, 288, include_bn=False)
    assert (ignore_bn.num_layers, ignore_bn.num_tokens) == (21, 39_124)
    stats = layout_from_state_dict(resnet18_sd, 288, include_running_stats=True)
    assert stats.num_layers == 41 + 40 and "bn1.running_mean" in stats.token_keys()
    assert not any("num_batches_tracked" in k for k in stats.token_keys())


def test_cnn3_counts_match_reference():
    sd = build_model("cnn_l").state_dict()
    assert layout_from_state_dict(sd, 288).num_layers == 5
    assert layout_from_state_dict(sd, 288).num_tokens == 108
    assert layout_from_state_dict(sd, 289).num_tokens == 93


def test_positions_mask_and_padding_by_hand():
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([10.0, 20.0]),
          "b.weight": torch.arange(1.0, 5.0).reshape(4, 1)}
    layout = layout_from_state_dict(sd, tokensize=3)
    tokens = tokenize(sd, layout)
    expected = torch.tensor([[0, 1, 2], [10, 0, 0], [3, 4, 5], [20, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0],
                             [4, 0, 0]], dtype=torch.float32)
    assert torch.equal(tokens, expected)
    assert layout.positions_NP.tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 1], [3, 0, 1], [4, 1, 0], [5, 1, 1],
                                            [6, 1, 2], [7, 1, 3]]
    assert layout.positions_NP.dtype == torch.int32
    assert layout.mask_ND[1].tolist() == [True, False, False] and layout.mask_ND[0].all()


def test_bias_needs_exact_weight_name():
    sd = {"x.weight": torch.ones(2, 2), "x.weight_bias": torch.ones(2), "x.bias": torch.zeros(2),
          "y.weightless": torch.ones(3, 3)}
    layout = layout_from_state_dict(sd, tokensize=4)
    assert [(e.key, e.bias_key) for e in layout.entries] == [("x.weight", "x.bias")]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("include_bn,stats", [(True, False), (False, False), (True, True)])
def test_round_trip_is_bit_exact(arch, include_bn, stats, resnet18_sd):
    sd = resnet18_sd if arch == "resnet18" else _sd(arch, seed=1)
    layout = layout_from_state_dict(sd, 288, include_bn=include_bn, include_running_stats=stats)
    tokens = tokenize(sd, layout)
    assert tokens.dtype == torch.float32 and tokens.shape == (layout.num_tokens, 288)
    assert torch.count_nonzero(tokens[~layout.mask_ND]) == 0
    reference = build_model(arch).state_dict()  # fresh init: different weights and running stats
    back = detokenize(tokens, layout, reference)
    assert list(back) == list(sd)
    token_keys = set(layout.token_keys())
    for key, value in sd.items():
        source = value if key in token_keys else reference[key]
        assert back[key].dtype == source.dtype and torch.equal(back[key], source), key


def test_layout_json_round_trip_and_stable_id():
    sd = build_model("resnet_mini").state_dict()
    layout = layout_from_state_dict(sd, 64)
    again = TokenLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again == layout and again.layout_id == layout.layout_id
    assert torch.equal(again.mask_ND, layout.mask_ND) and torch.equal(again.positions_NP, layout.positions_NP)
    other = layout_from_state_dict(build_model("resnet_mini", num_classes=5).state_dict(), 64)
    assert other.layout_id != layout.layout_id
    assert layout_from_state_dict(sd, 64, include_running_stats=True).layout_id != layout.layout_id


def test_errors_are_one_line_data_errors():
    layout = layout_from_state_dict(build_model("resnet18").state_dict(), 288)
    layout.check_max_positions([60000, 150, 600])
    with pytest.raises(DataError, match="max_positions") as err:
        layout.check_max_positions([40000, 150, 600])
    assert "tokensize" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError):
        layout_from_state_dict({"a.weight": torch.ones(2, 2)}, tokensize=0)
    small = layout_from_state_dict(build_model("cnn_s").state_dict(), 288)
    with pytest.raises(DataError, match="shape"):
        tokenize(build_model("cnn_s", num_classes=5).state_dict(), small)
    with pytest.raises(DataError, match="lacks"):
        tokenize({"module_list.0.weight": torch.ones(8, 1, 5, 5)}, small)
    with pytest.raises(DataError):
        detokenize(torch.zeros(3, 288), small, build_model("cnn_s").state_dict())
