"""Named presets: small functions that adjust the default sections for a purpose.

``default`` is the dataclass defaults; ``tiny`` runs every stage in seconds (tests); ``small`` fits the
demo's backbone on 2 CPU cores; ``paper`` carries the reference experiment's values. ``config.load``
starts from one of these, then applies YAML files and ``--set`` overrides.
"""
from __future__ import annotations

from collections.abc import Callable

from mzsane.config import Config, LossConfig, ModelConfig, ZooConfig


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
    cfg.model = ModelConfig(d_model=512, num_heads=8, num_layers=1, latent_dim=32)
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


PRESETS: dict[str, Callable[[], Config]] = {"default": Config, "tiny": tiny, "small": small, "paper": paper}
