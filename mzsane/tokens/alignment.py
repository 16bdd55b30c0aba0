"""Weight matching: permute one model's hidden neurons into another's basis (git re-basin), so that
models can be averaged (soups) or compared (novelty) neuron by neuron.

Why: two models trained from different seeds are close only up to the permutation symmetries of
``symmetries.py``; coordinate descent over those groups, one exact linear sum assignment per group per
sweep, finds the permutation that best matches a reference. The assignment is scipy's exact, compiled
solver (the field's standard), not a copy of it.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from scipy.optimize import linear_sum_assignment

from mzsane.errors import DataError
from mzsane.tokens.symmetries import PermSpec, permute_state_dict, permute_tensor, spec_builder


def _axis_rows(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """[size, -1] view of ``t`` with group ``axis`` first (input groups may own blocks of columns)."""
    if axis == 0:
        return t.reshape(size, -1)
    return t.reshape(t.shape[0], size, -1).transpose(0, 1).reshape(size, -1)


def match_weights(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], spec: PermSpec,
                  max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Git re-basin weight matching: coordinate descent, one linear sum assignment per group per sweep.

    Returns perms such that ``permute_state_dict(state_dict, perms, spec)`` is close to ``reference``;
    stops when a full sweep (in a seeded random group order) improves nothing.
    """
    for key in spec.axes:
        if key not in reference or tuple(reference[key].shape) != tuple(state_dict[key].shape):
            raise DataError(f"reference checkpoint lacks {key} or has another shape; align models of one architecture")
    members = spec.members()
    groups = sorted(spec.sizes)
    perms = {g: torch.arange(spec.sizes[g]) for g in groups}
    a = {k: reference[k].detach().double() for k in spec.axes}
    b = {k: state_dict[k].detach().double() for k in spec.axes}
    rng = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for gi in torch.randperm(len(groups), generator=rng).tolist():
            g, n = groups[gi], spec.sizes[groups[gi]]
            score = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in members[g]:
                others = tuple(None if ax == axis else grp for ax, grp in enumerate(spec.axes[key]))
                wb = permute_tensor(b[key], others, perms)
                score += _axis_rows(a[key], axis, n) @ _axis_rows(wb, axis, n).T
            new = torch.from_numpy(linear_sum_assignment(score.numpy(), maximize=True)[1])
            old_val = score[torch.arange(n), perms[g]].sum()
            new_val = score[torch.arange(n), new].sum()
            if new_val > old_val + 1e-12 * max(1.0, abs(float(old_val))):
                perms[g], improved = new, True
        if not improved:
            break
    return perms


def align(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], arch: str,
          max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """``state_dict`` of architecture ``arch`` permuted to best match ``reference`` (soups, novelty)."""
    spec = spec_builder(arch)({k: tuple(v.shape) for k, v in state_dict.items()})
    perms = match_weights(state_dict, reference, spec, max_iter=max_iter, seed=seed)
    return permute_state_dict(state_dict, perms, spec)


class ReferenceAligner:
    """Aligns many models of one architecture to one reference (SANE's preprocessing of a zoo: every model in
    the reference's neuron order before tokenizing, so the backbone need not learn the permutations).

    A model's permutation is found once (``fit``, e.g. on its last epoch) and applied to each of its
    checkpoints (``apply``), so a model's trajectory stays in one basis; the function never changes.
    """

    def __init__(self, reference: Mapping[str, torch.Tensor], arch: str, max_iter: int = 100, seed: int = 0):
        self.reference = {k: v.detach() for k, v in reference.items()}
        self.spec = spec_builder(arch)({k: tuple(v.shape) for k, v in reference.items()})
        self.max_iter, self.seed = max_iter, seed

    def fit(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return match_weights(state_dict, self.reference, self.spec, max_iter=self.max_iter, seed=self.seed)

    def apply(self, state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        return permute_state_dict(state_dict, perms, self.spec)


__all__ = ["ReferenceAligner", "align", "match_weights"]
