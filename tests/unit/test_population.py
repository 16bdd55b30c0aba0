"""Batched population training/evaluation equals the plain per-model computation."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from mzsane.errors import DataError
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import epoch_order, load_dataset
from mzsane.zoo.evaluation import evaluate_models, finetune, reestimate_bn
from mzsane.zoo.population import auto_backend, init_population, retain_freed_memory, train_population
from mzsane.zoo.stacked import stack_state_dicts

torch.set_num_threads(1)
SPEC = {"architecture": "cnn_s", "channels_in": 1, "num_classes": 10, "image_size": 28}


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def small(data):
    return data.train.subset(120, seed=3), {"val": data.val.subset(64, seed=1), "test": data.test.subset(64, seed=2)}


def _hp(seed, lr=1e-3, optimizer="adam", wd=0.0, init="kaiming_uniform", batch_size=10):
    return {"seed": seed, "lr": lr, "optimizer": optimizer, "weight_decay": wd, "momentum": 0.9,
            "batch_size": batch_size, "activation": "tanh", "dropout": 0.0, "init": init}


def _plain_training(hp, train, epochs):
    torch.manual_seed(hp["seed"])
    model = build_model("cnn_s", activation="tanh", init=hp["init"])
    if hp["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=0.9, weight_decay=hp["weight_decay"])
    for epoch in range(1, epochs + 1):
        order = epoch_order(len(train), hp["seed"], epoch)
        for s in range(0, len(train), hp["batch_size"]):
            index = order[s:s + hp["batch_size"]]
            opt.zero_grad()
            F.cross_entropy(model(train.x[index]), train.y[index]).backward()
            opt.step()
    return model.state_dict()


@pytest.mark.parametrize("batch_size,backend", [(10, "batched"), (32, "loop")])
def test_batched_equals_unbatched_training(data, small, batch_size, backend):
    train, evals = small
    hps = [_hp(1), _hp(2, lr=2e-2, optimizer="sgd", wd=1e-3), _hp(3, lr=3e-4, wd=1e-4, init="uniform")]
    hps = [{**h, "batch_size": batch_size} for h in hps]
    results = train_population(SPEC, hps, data, 2, train=train, eval_splits=evals, backend=backend)
    for hp, res in zip(hps, results):
        assert res.status == "ok" and [row["epoch"] for row in res.epochs] == [0, 1, 2]
        assert sorted(res.checkpoints) == [0, 1, 2]
        reference = _plain_training(hp, train, 2)
        for key, value in reference.items():
            assert torch.allclose(res.checkpoints[2][key], value, atol=1e-5, rtol=1e-4), key
    # epoch 0 is the untouched initialization; models of one population differ
    key = "module_list.0.weight"
    assert not torch.equal(results[0].checkpoints[2][key], results[1].checkpoints[2][key])


def test_deterministic_per_seed_and_mixed_structures_rejected(data, small):
    train, evals = small
    a = train_population(SPEC, [_hp(5), _hp(6)], data, 1, train=train, eval_splits=evals)
    b = train_population(SPEC, [_hp(6), _hp(5)], data, 1, train=train, eval_splits=evals)
    for key in a[0].checkpoints[1]:
        assert torch.equal(a[0].checkpoints[1][key], b[1].checkpoints[1][key])  # same seed, same weights
    assert a[0].epochs == b[1].epochs
    with pytest.raises(DataError, match="group models first"):
        train_population(SPEC, [_hp(1), {**_hp(2), "activation": "relu"}], data, 1, train=train)


def test_diverged_model_is_reported_not_lost(data, small):
    train, evals = small
    results = train_population(SPEC, [_hp(1), _hp(2, lr=1e38, optimizer="sgd")], data, 2, train=train,
                               eval_splits=evals)
    assert results[0].status == "ok" and len(results[0].epochs) == 3
    assert results[1].status == "diverged" and "non-finite" in results[1].error
    assert 0 in results[1].checkpoints and 2 not in results[1].checkpoints  # finite epochs kept
    assert all(torch.isfinite(v).all() for v in results[0].checkpoints[2].values())


def test_evaluate_models_matches_plain_evaluation(data):
    spec = {**SPEC, "activation": "tanh"}
    sds = init_population({**spec, "init": "kaiming_normal"}, [1, 2, 3])
    test = data.test.subset(150, seed=0)
    got = evaluate_models(spec, sds, test.x, test.y, batch_size=64)
    for sd, (loss, acc) in zip(sds, got):
        model = build_model("cnn_s", activation="tanh").eval()
        model.load_state_dict(sd)
        with torch.no_grad():
            logits = model(test.x)
        assert loss == pytest.approx(float(F.cross_entropy(logits, test.y)), rel=1e-4)
        assert acc == pytest.approx(float((logits.argmax(1) == test.y).float().mean()), abs=1e-6)
    mixed = evaluate_models([spec, {**spec, "activation": "relu"}], sds[:2], test.x, test.y)
    assert mixed[0] == pytest.approx(got[0], rel=1e-5) and mixed[1] != pytest.approx(got[1], rel=1e-3)


def test_reestimate_bn_moves_running_stats_to_the_data(data):
    spec = {"architecture": "resnet_mini", "channels_in": 1, "num_classes": 10, "image_size": 28}
    sds = init_population(spec, [1, 2])
    for sd in sds:  # stale statistics, as in generated or averaged weights
        sd["bn1.running_mean"].fill_(5.0)
        sd["bn1.running_var"].fill_(100.0)
    x = data.train.x[:256]
    new = reestimate_bn(spec, sds, x, iterations=4, batch_size=32, generator=torch.Generator().manual_seed(0))
    batches = [torch.randint(0, len(x), (32,), generator=g) for g in [torch.Generator().manual_seed(0)]
               for _ in range(4)]
    for sd, old in zip(new, sds):
        model = build_model("resnet_mini", channels_in=1)
        model.load_state_dict(old)
        with torch.no_grad():
            feats = [model.conv1(x[b]) for b in batches]
        expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
        assert torch.allclose(sd["bn1.running_mean"], expected_mean, atol=1e-5)
        assert torch.allclose(sd["bn1.running_var"], expected_var, rtol=1e-4, atol=1e-6)
        assert torch.equal(sd["conv1.weight"], old["conv1.weight"])  # weights untouched
    assert float(stack_state_dicts(sds)["bn1.running_mean"].mean()) == 5.0  # inputs not mutated


@pytest.mark.slow  # ~40 s on 2 shared cores
def test_finetune_returns_improving_curves(data):
    spec = {**SPEC, "activation": "tanh"}
    sds = init_population({**spec, "init": "kaiming_uniform"}, [1, 2])
    curves = finetune(spec, sds, data, epochs=2, lr=3e-3, batch_size=32, max_train_images=256)
    assert len(curves) == 2 and [row["epoch"] for row in curves[0]] == [0, 1, 2]
    for curve in curves:
        assert set(curve[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"}
        assert curve[-1]["test_loss"] < curve[0]["test_loss"]


def test_backend_choice_and_allocator_setting():
    resnet = {"architecture": "resnet_mini", "channels_in": 1, "num_classes": 10, "image_size": 28}
    assert auto_backend({**SPEC, "activation": "tanh"}, 64) == "batched"  # grouped CNNs: batched at any batch
    assert auto_backend(resnet, 10) == "batched" and auto_backend(resnet, 64) == "loop"
    with pytest.raises(DataError, match="unknown population backend 'vmap'"):
        train_population(SPEC, [_hp(1)], None, 1, train=load_dataset("mnist").train.subset(20, seed=0),
                         eval_splits={}, backend="vmap")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert retain_freed_memory() is True


def test_dropout_trains_stochastically_but_reproducibly_and_is_off_in_evaluation(data, small):
    train, evals = small
    hps = [{**_hp(s), "dropout": 0.5} for s in (1, 2)]
    alone = train_population(SPEC, hps[:1], data, 1, train=train, eval_splits=evals)
    first = train_population(SPEC, hps, data, 1, train=train, eval_splits=evals)
    for key, value in alone[0].checkpoints[1].items():  # masks per model: population mates do not matter
        assert torch.allclose(first[0].checkpoints[1][key], value, atol=1e-5, rtol=1e-4), key
    again = train_population(SPEC, hps, data, 1, train=train, eval_splits=evals)
    plain = train_population(SPEC, [_hp(1), _hp(2)], data, 1, train=train, eval_splits=evals)
    for a, b, p in zip(first, again, plain):
        for key in a.checkpoints[1]:
            assert torch.equal(a.checkpoints[1][key], b.checkpoints[1][key])  # same group seed, same masks
        assert a.epochs[0]["test_acc"] == p.epochs[0]["test_acc"]  # same init; dropout off in eval mode
        # the masks changed the updates: dropout keys sit at 0,4,8,11,14 instead of 0,3,6,9,11
        assert not torch.allclose(a.checkpoints[1]["module_list.14.weight"], p.checkpoints[1]["module_list.11.weight"])
