"""The training budget by exposure, and what each zoo actually contributed to it.

Why: comparing a single-zoo with a multi-zoo backbone at equal *steps* gives the multi-zoo run a fraction
of the passes per zoo (the demo's 800 steps were ~145 passes over mnist alone but ~64 over three zoos).
The paper trains a fixed number of epochs, so its steps grow with the data. ``train.num_epochs`` does the
same here: steps = ceil(num_epochs * windows per epoch / (batch_size * world_size)), where an epoch cuts
``windows_of(num_tokens, window_size, data.windows_per_row)`` windows from every selected row (one
checkpoint; ``data.epochs`` / ``data.num_tail_epochs`` decide which), so a ResNet row of 490 tokens
counts ~8 windows where a small CNN's counts 1, exactly as the reader cuts them. 0 keeps ``train.num_steps``.
The OneCycle schedule is built for the resolved step count,
so it reaches its floor exactly when the budget is spent, never before.

"Exposure" is what each zoo put in front of the model: samples (windows), valid tokens and valid weight
entries, counted on every rank during training and summed. A ResNet window carries more valid entries than
a small CNN's, so equal samples are not equal weight in the loss; the figure makes that visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mzsane.errors import ConfigError

EXPOSURE_FILE = "exposure.json"


def steps_for_epochs(num_epochs: float, num_windows: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps that show every window of an epoch ``num_epochs`` times across all ranks (at least 1)."""
    if num_epochs <= 0:
        raise ConfigError(f"train.num_epochs={num_epochs} gives no budget; set it > 0, or 0 to use train.num_steps")
    return max(1, math.ceil(num_epochs * num_windows / (max(batch_size, 1) * max(world_size, 1))))


def windows_per_row(cfg: Any, manifest: Any, zoos: list[str]) -> dict[str, int]:
    """Windows the reader cuts from one row of each zoo (1 per row where the reader predates windows_per_row)."""
    try:
        from mzsane.train.data import windows_of
    except ImportError:
        return dict.fromkeys(zoos, 1)
    per_row = getattr(cfg.data, "windows_per_row", 1)
    return {z: windows_of(int(manifest.zoos[z]["num_tokens"]), cfg.data.window_size, per_row) for z in zoos}


@dataclass
class Budget:
    """The resolved step count and the data it was derived from (written beside the run's config)."""

    num_steps: int
    num_epochs: float  # 0 = steps were given directly (train.num_steps)
    rows: int  # selected train rows over all zoos
    rows_per_zoo: dict[str, int] = field(default_factory=dict)
    samples_per_step: int = 0  # batch_size * world_size (windows)
    windows_per_row: dict[str, int] = field(default_factory=dict)  # per zoo, as the reader cuts them

    @property
    def windows_per_epoch(self) -> int:
        return sum(n * self.windows_per_row.get(z, 1) for z, n in self.rows_per_zoo.items())

    @property
    def epochs_covered(self) -> float:
        """Passes over the selected rows' windows the budget amounts to (equals num_epochs up to rounding)."""
        return self.num_steps * self.samples_per_step / max(self.windows_per_epoch, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps, "num_epochs": self.num_epochs, "rows": self.rows,
                "rows_per_zoo": dict(self.rows_per_zoo), "windows_per_row": dict(self.windows_per_row),
                "windows_per_epoch": self.windows_per_epoch, "samples_per_step": self.samples_per_step,
                "epochs_covered": self.epochs_covered}


def measure(cfg: Any, manifest: Any, selection: Any, world_size: int) -> Budget:
    """The budget of ``cfg`` on ``world_size`` ranks over an opened train selection, at ``cfg``'s step count: a
    worker's view of its finished config (the driver planned the steps, ``plan``), for ``exposure.json``."""
    rows_per_zoo = selection.rows_per_zoo()
    return Budget(num_steps=int(cfg.train.num_steps), num_epochs=float(cfg.train.num_epochs),
                  rows=sum(rows_per_zoo.values()), rows_per_zoo=rows_per_zoo,
                  samples_per_step=int(cfg.train.batch_size) * int(world_size),
                  windows_per_row=windows_per_row(cfg, manifest, list(rows_per_zoo)))


def plan(cfg: Any, manifest: Any, selection: Any, world_size: int) -> Budget:
    """``measure`` with the step count ``train.num_epochs`` asks for (0: ``train.num_steps`` as given); the driver
    plans once and writes the steps into the finished config, so every rank runs the same schedule."""
    budget = measure(cfg, manifest, selection, world_size)
    if budget.num_epochs > 0:
        budget.num_steps = steps_for_epochs(budget.num_epochs, budget.windows_per_epoch, cfg.train.batch_size,
                                            world_size)
    return budget


class Exposure:
    """Per-zoo counts of what training consumed: samples (windows), valid tokens, valid weight entries."""

    KEYS = ("samples", "tokens", "entries")

    def __init__(self, state: dict | None = None):
        self.counts: dict[str, dict[str, int]] = {z: {k: int(v.get(k, 0)) for k in self.KEYS}
                                                  for z, v in (state or {}).items()}

    def add(self, zoos: list[str], valid_BT: torch.Tensor, mask_BTD: torch.Tensor) -> None:
        """Count one training batch (the windows actually fed to the model)."""
        tokens_B = valid_BT.reshape(len(zoos), -1).sum(1).tolist()
        entries_B = mask_BTD.reshape(len(zoos), -1).sum(1).tolist()
        for zoo, tokens, entries in zip(zoos, tokens_B, entries_B):
            c = self.counts.setdefault(zoo, dict.fromkeys(self.KEYS, 0))
            c["samples"] += 1
            c["tokens"] += int(tokens)
            c["entries"] += int(entries)

    def state(self) -> dict[str, dict[str, int]]:
        return {z: dict(v) for z, v in self.counts.items()}

    @staticmethod
    def merge(states: list[dict]) -> dict[str, dict[str, Any]]:
        """Sum over ranks, plus each zoo's share of all valid entries (its weight in the reconstruction loss)."""
        total: dict[str, dict[str, Any]] = {}
        for state in states:
            for zoo, counts in (state or {}).items():
                c = total.setdefault(zoo, dict.fromkeys(Exposure.KEYS, 0))
                for k in Exposure.KEYS:
                    c[k] += int(counts.get(k, 0))
        entries = sum(c["entries"] for c in total.values())
        for c in total.values():
            c["entry_share"] = c["entries"] / entries if entries else 0.0
        return dict(sorted(total.items()))


def summary(budget: Budget, exposure: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What ``{run}/exposure.json`` holds: the budget and per-zoo exposure (with passes over each zoo's rows)."""
    per_zoo = {}
    for zoo, c in exposure.items():
        windows = budget.rows_per_zoo.get(zoo, 0) * budget.windows_per_row.get(zoo, 1)
        per_zoo[zoo] = {**c, "rows": budget.rows_per_zoo.get(zoo, 0), "windows_per_row": budget.windows_per_row.get(
            zoo, 1), "passes": c["samples"] / windows if windows else 0.0}
    return {"budget": budget.to_dict(), "zoos": per_zoo}
