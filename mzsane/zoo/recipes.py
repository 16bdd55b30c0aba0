"""Hyper-parameter recipes: which models a zoo holds and how long each trains.

Why recipes are code, not config: the Model Zoos "Seed" and "Hyp-10-fix" zoos are defined by exact grids
(``../shared/model-zoos-protocol.md`` section 0/4); writing them once here means ``--set zoo.recipe=seed``
reproduces the published protocol without anyone retyping 2,560 combinations. A recipe gives

* defaults for the zoo size (models, epochs, batch size, train/eval images), used wherever the
  ``ZooConfig`` field is 0, and
* ``members(num_models, seed, architecture, batch_size)``: one hparams dict per model
  (seed, lr, optimizer, weight_decay, momentum, batch_size, activation, dropout, init), deterministic
  in its arguments, so a resumed build assigns the same hyper-parameters to the same model id.

Recipes:
* ``seed``  - Model Zoos "Seed": seeds 1..N, tanh, U(0,1) init (biases 0.01), Adam 3e-4, wd 0, no
  dropout, batch 10, 50 epochs, whole 50k train split, full val/test.
* ``hyp10`` - Model Zoos "Hyp-10-fix" for MNIST/F-MNIST: activation x dropout x init x optimizer x lr x
  wd x seeds 1..10 = 2,560 models, batch 10, 50 epochs. Fewer models = a seeded subset of the grid.
* ``demo``  - the embedded demo's zoos, sized for ~10 minutes on 2 CPU cores: varied seed, init,
  optimizer, lr and weight decay (one activation and no dropout, so every model of a zoo has the same
  state_dict keys), fewer epochs, larger batches, a subset of train images, capped eval images.
* ``tiny``  - a handful of models trained for seconds, for tests.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mzsane.errors import ConfigError

ACTIVATIONS = ("tanh", "relu", "sigmoid", "gelu")
INITS = ("uniform", "normal", "kaiming_uniform", "kaiming_normal")
SIZE_KEYS = ("num_models", "num_epochs", "batch_size", "max_train_images", "max_eval_images")


def _hp(seed: int, lr: float, optimizer: str, weight_decay: float, batch_size: int, activation: str | None,
        dropout: float, init: str, momentum: float = 0.9) -> dict:
    return {"seed": int(seed), "lr": float(lr), "optimizer": optimizer, "weight_decay": float(weight_decay),
            "momentum": float(momentum), "batch_size": int(batch_size), "activation": activation,
            "dropout": float(dropout), "init": init}


def _seed_members(num_models: int, seed: int, architecture: str, batch_size: int) -> list[dict]:
    return [_hp(s, 3e-4, "adam", 0.0, batch_size, "tanh", 0.0, "uniform") for s in range(1, num_models + 1)]


def hyp10_grid(batch_size: int = 10) -> list[dict]:
    """The full Hyp-10-fix grid in Model Zoos order (256 configurations x seeds 1..10)."""
    grid = itertools.product(ACTIVATIONS, (0.0, 0.5), INITS, ("adam", "sgd"), (1e-3, 1e-4), (1e-3, 1e-4),
                             range(1, 11))
    return [_hp(s, lr, opt, wd, batch_size, act, drop, init) for act, drop, init, opt, lr, wd, s in grid]


def _hyp10_members(num_models: int, seed: int, architecture: str, batch_size: int) -> list[dict]:
    grid = hyp10_grid(batch_size)
    if num_models > len(grid):
        raise ConfigError(f"zoo.num_models={num_models} exceeds the Hyp-10 grid ({len(grid)} models); "
                          f"set zoo.num_models <= {len(grid)}")
    if num_models == len(grid):
        return grid
    keep = np.sort(np.random.default_rng(seed).choice(len(grid), size=num_models, replace=False))
    return [grid[i] for i in keep]


def _demo_members(num_models: int, seed: int, architecture: str, batch_size: int) -> list[dict]:
    """Seeded draws with real spread; ResNets keep ReLU + default init and Adam (BN nets dislike U(0,1))."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(num_models):
        model_seed = seed * 100_000 + i + 1
        if architecture.startswith("resnet"):
            out.append(_hp(model_seed, 10 ** rng.uniform(-3.3, -2.3), "adam", float(rng.choice([0.0, 1e-4])),
                           batch_size, None, 0.0, "default"))
            continue
        init = str(rng.choice(["kaiming_uniform", "kaiming_normal", "default"]))
        if rng.uniform() < 0.75:
            optimizer, lr = "adam", 10 ** rng.uniform(-3.3, -2.2)
        else:
            optimizer, lr = "sgd", 10 ** rng.uniform(-2.0, -1.2)
        out.append(_hp(model_seed, lr, optimizer, float(rng.choice([0.0, 1e-4, 1e-3])), batch_size, "tanh", 0.0,
                       init))
    return out


def _tiny_members(num_models: int, seed: int, architecture: str, batch_size: int) -> list[dict]:
    act = None if architecture.startswith("resnet") else "tanh"
    init = "default" if architecture.startswith("resnet") else "kaiming_uniform"
    return [_hp(seed * 1000 + i + 1, (1e-3, 3e-3)[i % 2], "adam", 0.0, batch_size, act, 0.0, init)
            for i in range(num_models)]


@dataclass(frozen=True)
class Recipe:
    """Zoo-size defaults (per architecture) plus the deterministic list of per-model hparams."""

    name: str
    defaults: dict  # SIZE_KEYS -> value
    arch_defaults: dict  # architecture -> overrides of ``defaults``
    members_fn: Callable[[int, int, str, int], list[dict]]
    # the most distinct models its members can be (0: no limit): the grid's size, or the block of model seeds one
    # zoo seed owns (demo: seed * 100,000 + i + 1; tiny: seed * 1,000 + i + 1): beyond it models would repeat
    max_models: int = 0

    def sizes(self, architecture: str) -> dict:
        return {**self.defaults, **self.arch_defaults.get(architecture, {})}

    def members(self, num_models: int, seed: int, architecture: str, batch_size: int) -> list[dict]:
        return self.members_fn(num_models, seed, architecture, batch_size)


RECIPES: dict[str, Recipe] = {
    "seed": Recipe("seed", dict(num_models=1000, num_epochs=50, batch_size=10, max_train_images=-1,
                                max_eval_images=-1), {}, _seed_members),
    "hyp10": Recipe("hyp10", dict(num_models=2560, num_epochs=50, batch_size=10, max_train_images=-1,
                                  max_eval_images=-1), {}, _hyp10_members, max_models=2560),
    "demo": Recipe("demo", dict(num_models=30, num_epochs=3, batch_size=64, max_train_images=8_000,
                                max_eval_images=2_000),
                   {"resnet_mini": dict(num_models=8, num_epochs=3, batch_size=64, max_train_images=4_000,
                                        max_eval_images=1_000),
                    # ~0.45 GFLOP per forward image: 4,000 images x 3 epochs is minutes per model on a CPU core
                    "resnet18_gray": dict(num_models=8, num_epochs=3, batch_size=64, max_train_images=4_000,
                                          max_eval_images=1_000)}, _demo_members, max_models=99_999),
    "tiny": Recipe("tiny", dict(num_models=4, num_epochs=2, batch_size=32, max_train_images=512,
                                max_eval_images=256), {}, _tiny_members, max_models=999),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown zoo.recipe '{name}'; use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def resolve_sizes(recipe: str, architecture: str, overrides: dict) -> dict:
    """The recipe's sizes for ``architecture`` with every non-zero value of ``overrides`` applied."""
    sizes = get_recipe(recipe).sizes(architecture)
    for key in SIZE_KEYS:
        value = int(overrides.get(key, 0) or 0)
        if value:
            sizes[key] = value
    if sizes["num_models"] < 1 or sizes["num_epochs"] < 0 or sizes["batch_size"] < 1:
        raise ConfigError(f"zoo sizes {sizes} are invalid; set zoo.num_models >= 1, zoo.num_epochs >= 0 "
                          "and zoo.batch_size >= 1")
    check_buildable(recipe, sizes["num_models"])
    return sizes


def check_buildable(recipe: str, num_models: int) -> None:
    """Refuse, at once, a zoo larger than the recipe has distinct members for."""
    limit = get_recipe(recipe).max_models
    if limit and num_models > limit:
        raise ConfigError(f"zoo.num_models={num_models:,} exceeds what recipe '{recipe}' can build ({limit:,} "
                          f"distinct models); set zoo.num_models <= {limit:,}")
