"""The registry builds the reference networks with the reference key names and parameter counts."""
import pytest
import torch

from mzsane.errors import DataError
from mzsane.zoo.architectures import ARCHITECTURES, build_model, get_architecture, num_params


def _keys(model):
    return [k for k in model.state_dict() if k.endswith("weight")]


def test_cnn_s_matches_model_zoos():
    model = build_model("cnn_s")
    assert num_params(model) == 2464
    assert _keys(model) == [f"module_list.{i}.weight" for i in (0, 3, 6, 9, 11)]
    assert num_params(build_model("cnn_s", channels_in=3)) == 2864
    with_dropout = build_model("cnn_s", dropout=0.5)
    assert _keys(with_dropout) == [f"module_list.{i}.weight" for i in (0, 4, 8, 11, 14)]
    assert num_params(with_dropout) == 2464


def test_cnn_l_is_reference_cnn3():
    model = build_model("cnn_l")
    assert num_params(model) == 10853
    assert _keys(model) == [f"module_list.{i}.weight" for i in (0, 4, 8, 13, 16)]
    assert build_model("cnn_l")(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_cifar_counts_and_names():
    for classes, count in ((10, 11_173_962), (100, 11_220_132), (200, 11_271_432)):
        assert num_params(build_model("resnet18", num_classes=classes)) == count
    sd = build_model("resnet18").state_dict()
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 3)
    assert "layer2.0.downsample.0.weight" in sd and "layer2.0.downsample.1.running_var" in sd
    assert "layer1.0.downsample.0.weight" not in sd and "maxpool" not in " ".join(sd)
    assert tuple(sd["fc.weight"].shape) == (10, 512)
    gray = build_model("resnet18", channels_in=1, num_classes=7)
    assert gray(torch.zeros(1, 1, 28, 28)).shape == (1, 7)


def test_resnet_mini_and_mlp_are_small_and_run():
    mini = build_model("resnet_mini")
    assert 20_000 <= num_params(mini) <= 80_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in mini.modules())
    assert mini(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert build_model("mlp", width=16, depth=3)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_init_schemes_follow_model_zoos():
    g = torch.Generator().manual_seed(0)
    model = build_model("cnn_s", init="uniform", generator=g)
    w = model.module_list[0].weight
    assert w.min() >= 0 and w.max() <= 1 and w.std() > 0.2  # U(0,1), not fan-scaled
    assert torch.all(model.module_list[0].bias == 0.01)
    normal = build_model("cnn_s", init="normal", generator=g).module_list[3].weight
    assert 0.8 < normal.std() < 1.2
    a = build_model("mlp", init="kaiming_normal", generator=torch.Generator().manual_seed(5)).state_dict()
    b = build_model("mlp", init="kaiming_normal", generator=torch.Generator().manual_seed(5)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs", [{"activation": "swish"}, {"init": "xavier"}, {"dropout": 1.5}, {"nope": 1}])
def test_bad_arguments_raise_data_error(kwargs):
    with pytest.raises(DataError):
        build_model("cnn_s", **kwargs)


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(DataError) as err:
        get_architecture("vgg16")
    assert all(name in str(err.value) for name in ARCHITECTURES)
    assert "\n" not in str(err.value)


def test_resnet18_gray_has_the_resnet18_token_layout_on_28x28_images():
    """The normalization ablation's ResNet-18-like layout: the ResNet-18 state_dict (11.2M params) for 1x28x28
    inputs, with BatchNorm tokens ~11% of the tokens (resnet_mini: ~49%)."""
    from mzsane.tokens.layout import layout_from_state_dict

    model = build_model("resnet18_gray")
    ref = build_model("resnet18", channels_in=1, image_size=28)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    layout = layout_from_state_dict(model.state_dict())
    bn = sum(e.num_tokens for e in layout.entries if "bn" in e.key or "downsample.1" in e.key)
    assert layout.num_tokens == 43_924 and 0.10 < bn / layout.num_tokens < 0.12
