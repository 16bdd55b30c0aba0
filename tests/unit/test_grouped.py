"""The grouped channels-last population network computes what vmap over the plain modules computes."""
from __future__ import annotations

import pytest
import torch

from mzsane.zoo.grouped import grouped_forward
from mzsane.zoo.population import init_population
from mzsane.zoo.stacked import split_params, stack_state_dicts, template_for, vmapped

CASES = {
    "cnn_s": {"architecture": "cnn_s", "channels_in": 1, "num_classes": 10, "image_size": 28},
    "cnn_s_rgb_dropout": {"architecture": "cnn_s", "channels_in": 3, "num_classes": 10, "image_size": 28,
                          "dropout": 0.5},
    "cnn_l": {"architecture": "cnn_l", "channels_in": 3, "num_classes": 10, "image_size": 32},
    "mlp": {"architecture": "mlp", "channels_in": 1, "num_classes": 10, "image_size": 8},
}


def _population(spec, num_models=5):
    stacked = stack_state_dicts(init_population({**spec, "init": "kaiming_uniform", "activation": "gelu"},
                                                range(1, num_models + 1)))
    template = template_for({**spec, "activation": "gelu"}).eval()
    return template, *split_params(template, stacked)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_gradients_match_vmap(name):
    spec = CASES[name]
    template, params, buffers = _population(spec)
    size, channels = spec["image_size"], spec["channels_in"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, channels, size, size, generator=gen)  # each model its own images
    grouped = grouped_forward(template)
    assert grouped is not None
    reference = vmapped(template, shared_input=False)
    outputs, grads = [], []
    for fn in (grouped, reference):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out_MBK = fn(leaves, buffers, x)
        assert out_MBK.shape == (5, 4, 10)
        (out_MBK * torch.linspace(-1, 1, 10)).sum().backward()
        outputs.append(out_MBK.detach())
        grads.append({k: v.grad for k, v in leaves.items()})
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    for key in params:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-4, rtol=1e-4, msg=key)
    # models differ, so a mix-up of model groups would show
    assert not torch.allclose(outputs[0][0], outputs[0][1])


def test_models_with_batchnorm_or_residuals_stay_on_vmap():
    spec = {"architecture": "resnet_mini", "channels_in": 1, "num_classes": 10, "image_size": 28}
    assert grouped_forward(template_for({**spec, "activation": "relu"})) is None
