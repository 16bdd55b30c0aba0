"""Named presets: small functions that adjust the default sections for a purpose.

``default`` is the dataclass defaults; ``tiny`` runs every stage in seconds (tests); ``small`` fits the
demo's backbone on 2 CPU cores; ``paper`` carries the reference experiment's values; ``demo`` and ``demo_quick``
are what ``mzsane demo`` (``--quick``) runs. ``config.load`` starts from one of these (``named``), then applies
YAML files and ``--set`` overrides.
"""
from __future__ import annotations

from collections.abc import Callable

from mzsane.config import Config, LossConfig, ModelConfig, ZooConfig
from mzsane.errors import ConfigError


def tiny() -> Config:
    """Runs every stage in seconds on one CPU core: the preset tests use."""
    cfg = Config()
    cfg.zoo = ZooConfig(recipe="tiny", datasets=["mnist", "fashion_mnist"], extra_zoos=[], num_models=4,
                        num_epochs=2, batch_size=32, population_batch=4, max_train_images=1024, max_eval_images=512)
    cfg.tokens.tokensize = 64
    cfg.shards.rows_per_file = 16
    cfg.shards.rows_per_row_group = 4
    cfg.data.window_size = 16
    cfg.data.shuffle_buffer = 8
    cfg.model = ModelConfig(d_model=32, num_heads=2, num_layers=1, latent_dim=8, projection_dim=8)
    cfg.train.num_steps = 20
    cfg.train.batch_size = 4
    cfg.train.lr = 1e-3
    cfg.train.eval_every_n_steps = 10
    cfg.train.num_eval_batches = 2
    cfg.train.checkpoint_every_n_steps = 10
    cfg.train.log_every_n_steps = 5
    cfg.sample.num_anchors = 2
    cfg.sample.num_candidates = 8
    cfg.sample.num_keep = 2
    cfg.sample.halo_window = 12
    cfg.sample.halo_size = 2
    cfg.sample.candidate_batch_size = 4
    cfg.sample.bn_iterations = 2
    cfg.evaluate.finetune_epochs = 1
    cfg.evaluate.soup_sizes = [1, 2]
    cfg.evaluate.num_random = 2
    cfg.evaluate.hypernet_steps = 20
    return cfg


def small() -> Config:
    """The embedded demo's sizes: minutes per stage on 2 CPU cores."""
    cfg = Config()
    # one wide block (head dim 64) beats two narrow ones on CPU: 2048-token steps keep matmuls >= 85% of a
    # square matmul's FLOP/s (d_model 128 reached ~25%), at ~1-2 steps/s on 2 cores (mzsane bench model)
    cfg.model = ModelConfig(d_model=512, num_heads=8, num_layers=1, latent_dim=128)
    cfg.train.num_steps = 300
    cfg.train.batch_size = 16
    cfg.train.lr = 3e-4
    return cfg


def paper() -> Config:
    """The reference experiment's values (spec section 3.1 and 7); needs a large GPU."""
    cfg = Config()
    cfg.data.window_size = 256
    cfg.model = ModelConfig(d_model=2048, num_heads=16, num_layers=8, latent_dim=128,
                            max_positions=[60000, 150, 600])
    cfg.loss = LossConfig(gamma=0.05, norm_mode="batch", std_eps=1e-4, temperature=0.1)
    cfg.train.batch_size = 32
    cfg.train.lr = 2e-5
    cfg.train.grad_clip = 0.0
    cfg.train.precision = "auto"
    cfg.train.compile = True
    cfg.sample.halo_window = 128
    cfg.sample.halo_size = 12
    return cfg


def demo() -> Config:
    """``mzsane demo``: the default sizes with the demo's own settings, each measured on the demo zoos.

    lr 1e-3 reaches reconstruction R^2 ~0.9 in 600 steps where the default lr stays near 0.1; 2,000 val images rank
    candidates as well as 10,000 at a fifth of the cost. The zoo stage runs alone, so it takes both cores of the
    demo machine (1.5x faster: 36 vs 56 s for mnist-cnn_s); a fixed thread count, not "all cores", keeps the zoos
    bitwise the same on any machine. The backbones train with 2 Ray Train (DDP) workers, one per core, at 8 windows
    each: the same global batch of 16 as one worker at 16, so the same updates, with the work split over both cores.
    Chosen by measurement (issue 29, ``mzsane bench train``, docs/results/bench-train.json): against 1 worker x 2
    threads at batch 16, 2 x 1 was faster in 4 of 5 interleaved pairs on the shared 2-core machine (e.g. 6,027 vs
    4,956 real tokens/s). Budget by exposure (issue 13): 150 passes over each backbone's selected rows (the trained
    tail, epochs 2-3), so single (44 rows: 413 steps) and multi (100 rows, a ResNet row 8 windows: 1,725 steps)
    see every zoo equally often; at equal *steps* the multi-zoo backbone saw each zoo less than half as often and
    lost for that reason (docs/results.md).
    """
    cfg = Config()
    cfg.zoo.num_threads = 2
    cfg.zoo.extra_zoos = ["mnist:resnet_mini", "digits:cnn_s"]
    cfg.cluster.num_workers = 2
    cfg.train.batch_size = 8
    cfg.train.lr = 1e-3
    cfg.train.num_epochs = 150.0
    cfg.train.checkpoint_every_n_steps = 200
    cfg.train.eval_every_n_steps = 200
    cfg.sample.max_val_images = 2000
    cfg.evaluate.max_train_models = 10
    return cfg


def demo_quick() -> Config:
    """``mzsane demo --quick``: the demo shrunk to run in a few minutes (10-model zoos, no extra zoos)."""
    cfg = demo()
    cfg.zoo.num_models = 10
    cfg.zoo.num_epochs = 2
    cfg.zoo.max_train_images = 2000
    cfg.zoo.max_eval_images = 500
    cfg.zoo.extra_zoos = []
    cfg.train.checkpoint_every_n_steps = 100
    cfg.train.eval_every_n_steps = 100
    cfg.sample.num_candidates = 40
    cfg.sample.num_keep = 5
    cfg.sample.num_anchors = 3  # 10-model zoos hold 3 models outside the train split (held-out anchors)
    cfg.sample.candidate_batch_size = 20
    cfg.evaluate.finetune_epochs = 1
    cfg.evaluate.finetune_max_train_images = 2000
    cfg.evaluate.num_novelty_images = 500
    cfg.evaluate.max_train_models = 6
    cfg.evaluate.num_random = 3
    return cfg


PRESETS: dict[str, Callable[[], Config]] = {"default": Config, "tiny": tiny, "small": small, "paper": paper,
                                            "demo": demo, "demo_quick": demo_quick}


def named(name: str) -> Config:
    """A fresh config of the preset called ``name`` (``--preset``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
