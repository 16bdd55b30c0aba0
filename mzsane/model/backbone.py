"""A trained SANE backbone at inference, as ``sample``, ``evaluate`` and ``probe`` all use it: loaded from a run's
checkpoint, run over whole models in halo windows (``model/halo.py``), and the BatchNorm statistics of the models
it decodes re-estimated.

Why one home: the three stages must see one backbone the same way (eval mode, the checkpoint's own config, the
same BN conditioning), or a stage's figure could not be set beside another's.
"""
from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

from mzsane.config import Config
from mzsane.errors import CheckpointError
from mzsane.model.sane import SANE


def load_backbone(run_or_checkpoint_url: str) -> tuple[nn.Module, Config]:
    """The SANE model of a run's latest checkpoint (or of the given checkpoint), in eval mode, and its config."""
    # a checkpoint is the train stage's folder, read through storage: imported here, so that the rest of model/
    # stays pure torch
    from mzsane.train import checkpoint as ckpt

    url = ckpt.latest_checkpoint_url(run_or_checkpoint_url)
    if url is None:
        raise CheckpointError(f"no complete checkpoint under '{run_or_checkpoint_url}'; "
                              f"pass a run folder written by 'mzsane train' or one of its checkpoint_* folders")
    with tempfile.TemporaryDirectory(prefix="mzsane-backbone-") as scratch:
        weights, _, cfg = ckpt.load(ckpt.fetch(url, scratch))
    model = SANE(cfg.model, cfg.tokens.tokensize, list(cfg.model.max_positions))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{url}' does not fit the SANE model of its config "
                              f"(missing {len(missing)}, unexpected {len(unexpected)} keys); it is not a SANE backbone")
    model.eval()
    return model, cfg


def has_batchnorm(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("running_mean") for k in state_dict)


def condition_bn(kwargs: dict[str, Any], state_dicts: list[dict], images_NCHW: torch.Tensor, iterations: int,
                 batch_size: int, seed: int) -> list[dict]:
    """Re-estimate BN running statistics of all candidates at once (no-op without BatchNorm)."""
    if not state_dicts or not has_batchnorm(state_dicts[0]) or iterations <= 0:
        return state_dicts
    from mzsane.zoo.evaluation import reestimate_bn

    return reestimate_bn(kwargs, state_dicts, images_NCHW, iterations, batch_size, torch.Generator().manual_seed(seed))
