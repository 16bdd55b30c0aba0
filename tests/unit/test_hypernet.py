"""The HyperNetwork baseline: it learns the target task, and emits loadable weights for both zoo families."""
from __future__ import annotations

import pytest
import torch

from mzsane.evaluate import baselines
from mzsane.evaluate.hypernet import (
    HypernetSettings,
    HyperNetwork,
    generated_state_dict,
    hypernet_models,
    train_hypernet,
)
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import load_dataset
from mzsane.zoo.evaluation import evaluate_models

CNN = {"architecture": "cnn_s", "activation": "tanh", "channels_in": 1, "image_size": 28}
RESNET = {"architecture": "resnet_mini", "channels_in": 1, "image_size": 28}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist")


def test_hypernetwork_generated_weights_beat_random_init(data):
    """Fails when the hypernetwork does not learn: 120 Adam steps on 1,000 MNIST images (~4 s)."""
    settings = HypernetSettings(steps=120, batch_size=64, max_train_images=1000, seed=3)
    models, records = hypernet_models(CNN, data, settings, 1)
    randoms = baselines.random_models(CNN, "default", 2, 0)
    test = data.test.subset(500, seed=1)
    accs = [a for _, a in evaluate_models(CNN, models + randoms, test.x, test.y)]
    assert records[0]["final_loss"] < records[0]["first_loss"] - 0.5
    assert accs[0] > 0.5 and accs[0] > max(accs[1:]) + 0.3, accs


def test_hypernetwork_covers_every_parameter_and_only_parameters():
    net = build_model("resnet_mini", channels_in=1)
    params = {k: v.detach() for k, v in net.named_parameters()}
    hyper = HyperNetwork(params, embed_dim=4, hidden=8)
    out = hyper()
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in params.items()}
    # one row per output channel of each >=2-D tensor, one row per 1-D tensor
    rows = sum(p.shape[0] if p.dim() >= 2 else 1 for p in params.values())
    assert hyper.z_RE.shape == (rows, 4)
    # untrained output already has the default init's scale (per tensor), not unit scale
    conv = out["layer1.0.conv1.weight"].detach().std() / params["layer1.0.conv1.weight"].std()
    assert 0.3 < float(conv) < 3.0
    assert torch.allclose(out["bn1.weight"].mean(), torch.tensor(1.0), atol=0.2)


def test_resnet_state_dict_loads_with_fresh_bn_statistics(data):
    hyper, record = train_hypernet(RESNET, data, HypernetSettings(steps=2, batch_size=8, max_train_images=64))
    sd = generated_state_dict(hyper, RESNET)
    model = build_model("resnet_mini", channels_in=1)
    model.load_state_dict(sd)  # strict: same keys, same shapes, same order of creation
    assert list(sd) == list(model.state_dict())
    assert torch.equal(sd["bn1.running_mean"], torch.zeros_like(sd["bn1.running_mean"]))
    assert torch.equal(sd["bn1.running_var"], torch.ones_like(sd["bn1.running_var"]))
    assert record["settings"]["steps"] == 2 and record["target_params"] == 39354


def test_settings_are_checked():
    from mzsane.errors import ConfigError

    with pytest.raises(ConfigError, match="steps >= 0"):
        HypernetSettings(steps=-1).check()
