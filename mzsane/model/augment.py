"""Two augmented views of random windows of whole-model token sequences (spec section 5).

Why here and batched: the reference froze windows and 5 permutations per file at preprocessing time
(~100 GB per zoo) and shared one window offset and one view-2 permutation across a batch. Here every
sample of a batch draws its own window start and its own permutation at train time: view 1 is a slice and
view 2 a gather of only the window's entries (the permuter's sentinel index N*D and masked entries read
exactly 0), so a ResNet-18 sample costs its window, not its 12.6M weights. Noise and optional erasing then
run batched on the device; every draw comes from the caller's seeded generator.

View 1 is the canonical window, view 2 the same window of a randomly permuted model (optionally never the
identity). A batch is as long as its longest window, not ``window_size``: a model shorter than the window
(the demo's 48-token CNNs under a 64-token window) gives a batch of 48 positions, because every padded
position costs the same matmuls as a real one and carries nothing (a quarter of the demo's step was
padding). Only in a batch that mixes lengths are the shorter windows padded, with mask 0 and positions 0;
``valid_BT`` marks real tokens. ``pad_to_window=True`` (``data.pad_windows``) restores the fixed
``window_size`` length. The alternative, packing several short models into one window, was measured and
is not used (``mzsane bench train``'s ``packing`` figures): it computes the same per-token matmuls plus
attention across the whole packed window, which needs a block-diagonal mask (a slower SDPA path on CPU).
Mixed architectures in one batch are the normal case: layouts and permuters are keyed by layout id.

Shape legend: B batch, T tokens in window, N tokens in a whole model, D token width, P position axes.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch

from mzsane.config import AugmentConfig
from mzsane.errors import ConfigError, DataError


class IndexSampler(Protocol):
    """What the augmenter needs from ``mzsane.tokens.permutations.Permuter``."""

    def sample_index(self, generator: torch.Generator, num: int = 1) -> torch.Tensor:
        """LongTensor [num, N*D] into flat tokens; index N*D is the zero sentinel."""


@dataclass
class Views:
    """One training batch: two views of the same windows, sharing mask and positions."""

    view1_BTD: torch.Tensor
    view2_BTD: torch.Tensor
    mask_BTD: torch.Tensor  # bool: real weight entries
    positions_BTP: torch.Tensor  # long: (token, layer, row); 0 on padded tokens
    valid_BT: torch.Tensor  # bool: token belongs to the model (False = padding of a short model)

    @property
    def layer_BT(self) -> torch.Tensor:
        return self.positions_BTP[..., 1]

    def to(self, device: torch.device | str) -> Views:
        return Views(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


@dataclass
class Window:
    """One window of one model, cut before batching: canonical view and view-2 source, [w, D] each."""

    view1_wD: torch.Tensor
    view2_wD: torch.Tensor
    start: int  # first token of the window in the whole model
    layout_id: str
    zoo: str = ""  # the row it came from, for bookkeeping (exposure per zoo) only
    model_id: str = ""
    epoch: int = -1


@dataclass
class _LayoutInfo:
    num_tokens: int
    mask_ND: torch.Tensor
    positions_NP: torch.Tensor
    identity_K: torch.Tensor  # the index map of the identity permutation on valid entries (sentinel elsewhere)
    valid_K: torch.Tensor  # mask_ND flattened


def _unpack(sample: Any) -> tuple[torch.Tensor, str]:
    if isinstance(sample, (tuple, list)):
        return sample[0], sample[1]
    return sample.tokens_ND, sample.layout_id


class Augmenter:
    """Makes ``Views`` from whole-model samples; see the module docstring for why it is built this way."""

    def __init__(self, augment_cfg: AugmentConfig, window_size: int, permuters: Mapping[str, IndexSampler],
                 layouts: Mapping[str, Any], device: torch.device | str = "cpu", max_identity_redraws: int = 16,
                 pad_to_window: bool = False):
        if window_size < 1:
            raise ConfigError(f"data.window_size must be >= 1, got {window_size}")
        if augment_cfg.noise_mode not in ("multiplicative", "additive", "none"):
            raise ConfigError(f"augment.noise_mode '{augment_cfg.noise_mode}' is unknown; "
                              "use multiplicative, additive or none")
        self.cfg = augment_cfg
        self.window_size = int(window_size)
        self.pad_to_window = bool(pad_to_window)
        self.permuters = dict(permuters)
        self.device = torch.device(device)
        self.max_identity_redraws = max_identity_redraws
        self._layouts: dict[str, _LayoutInfo] = {}
        self._windowed: dict[str, bool] = {}
        for layout_id, layout in layouts.items():
            mask_ND = layout.mask_ND.bool()
            n, d = mask_ND.shape
            flat = mask_ND.reshape(-1)
            identity = torch.where(flat, torch.arange(n * d), torch.full_like(flat, n * d, dtype=torch.long))
            self._layouts[layout_id] = _LayoutInfo(n, mask_ND, layout.positions_NP.long(), identity, flat)
        self.tokensize = int(next(iter(self._layouts.values())).mask_ND.shape[1]) if self._layouts else 0

    def _layout(self, layout_id: str) -> _LayoutInfo:
        if layout_id not in self._layouts:
            raise DataError(f"sample layout '{layout_id}' is not among the augmenter's layouts "
                            f"{sorted(self._layouts)}; pass every layout of the shard manifest")
        return self._layouts[layout_id]

    def _window_index(self, layout_id: str, token_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """View 2's gather index [w*D] into the sample's flat tokens (+ sentinel N*D) for one fresh draw.

        A sampler whose ``sample_index`` takes ``token_ids`` (the real ``Permuter``) computes only the
        window's indices, which matters for large models (a whole ResNet-18 index is ~100 MB); others give
        the whole-model index, which is sliced. "Never the identity" is judged on the whole model.
        """
        if layout_id not in self.permuters:
            raise DataError(f"no permuter for layout '{layout_id}'; pass one per layout or set "
                            "augment.permute_view_2=false")
        sampler = self.permuters[layout_id]
        if layout_id not in self._windowed:
            params = inspect.signature(sampler.sample_index).parameters
            self._windowed[layout_id] = "token_ids" in params and "avoid_identity" in params
        if self._windowed[layout_id]:
            return sampler.sample_index(generator, 1, token_ids=token_ids,
                                        avoid_identity=self.cfg.avoid_identity)[0].long().cpu()
        info = self._layout(layout_id)
        index_K = sampler.sample_index(generator, 1)[0].long().cpu()
        for _ in range(self.max_identity_redraws if self.cfg.avoid_identity else 0):
            if not bool((index_K[info.valid_K] == info.identity_K[info.valid_K]).all()):
                break  # a layout without permutable groups keeps the identity after the redraws
            index_K = sampler.sample_index(generator, 1)[0].long().cpu()
        D = info.mask_ND.shape[1]
        return index_K.view(info.num_tokens, D)[token_ids].reshape(-1)

    def _check(self, tokens_ND: torch.Tensor, layout_id: str) -> _LayoutInfo:
        info = self._layout(layout_id)
        if tuple(tokens_ND.shape) != (info.num_tokens, self.tokensize):
            raise DataError(f"tokens of shape {tuple(tokens_ND.shape)} do not match layout '{layout_id}' "
                            f"[{info.num_tokens}, {self.tokensize}]; re-shard with the same tokens settings")
        return info

    def _start(self, u: float, info: _LayoutInfo) -> int:
        room = max(info.num_tokens - self.window_size, 0)
        return min(int(u * (room + 1)), room)

    def _cut_at(self, tokens_ND: torch.Tensor, layout_id: str, info: _LayoutInfo, s: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(view 1, view 2 before noise) [w, D] of the window at ``s``: a slice, and a gather of only w*D entries
        (never a copy of the whole model); masked entries read exactly 0."""
        w, D = min(info.num_tokens, self.window_size), self.tokensize
        mask_wD = info.mask_ND[s:s + w]
        view1_wD = torch.where(mask_wD, tokens_ND[s:s + w].float().cpu(), 0.0)
        if not self.cfg.permute_view_2:
            return view1_wD, view1_wD
        index_K = self._window_index(layout_id, torch.arange(s, s + w), generator)
        keep_K = mask_wD.reshape(-1) & (index_K < info.num_tokens * D)  # index N*D is the zero sentinel
        flat = tokens_ND.reshape(-1)
        gathered = flat[index_K.clamp(max=info.num_tokens * D - 1).to(flat.device)].float().cpu()
        return view1_wD, torch.where(keep_K, gathered, 0.0).view(w, D)

    def cut(self, tokens_ND: torch.Tensor, layout_id: str, generator: torch.Generator, zoo: str = "",
            model_id: str = "", epoch: int = -1) -> Window:
        """One random window of a whole model with its view-2 source: what a training stream buffers, so
        its memory is set by the window (2*w*D floats), not by the model (a ResNet-18 row is ~50 MB)."""
        info = self._check(tokens_ND, layout_id)
        u = float(torch.rand(1, generator=generator, device=generator.device).cpu()[0])
        s = self._start(u, info)
        view1_wD, view2_wD = self._cut_at(tokens_ND, layout_id, info, s, generator)
        return Window(view1_wD, view2_wD.clone() if view2_wD is view1_wD else view2_wD, s, layout_id, zoo, model_id,
                      epoch)

    def make_views(self, samples: Sequence[Any], generator: torch.Generator) -> Views:
        """``samples``: ``Window`` objects (cut by ``cut``), or whole models: objects with ``tokens_ND`` and
        ``layout_id`` (shard ``Sample``) or (tokens_ND, layout_id), whose windows are drawn here."""
        if not samples:
            raise DataError("make_views got an empty batch; check the data selection is not empty")
        if all(isinstance(s, Window) for s in samples):
            cuts = [(self._layout(s.layout_id), s.start, s.view1_wD, s.view2_wD) for s in samples]
        elif any(isinstance(s, Window) for s in samples):
            raise DataError("make_views got a batch mixing cut windows and whole models; pass one kind")
        else:
            tokens, layout_ids = zip(*(_unpack(s) for s in samples))
            infos = [self._check(t, lid) for t, lid in zip(tokens, layout_ids)]
            # ---- window starts, one per sample, then each sample's permutation draw
            u_B = torch.rand(len(samples), generator=generator, device=generator.device).cpu()
            starts = [self._start(float(u), i) for u, i in zip(u_B, infos)]
            cuts = [(i, s, *self._cut_at(t, lid, i, s, generator))
                    for t, lid, i, s in zip(tokens, layout_ids, infos, starts)]
        return self._assemble(cuts, generator)

    def token_counts(self, windows: Sequence[Window]) -> tuple[int, int]:
        """(real tokens, positions computed) of a batch of cut windows: what ``make_views`` will hand the model
        for one view, so throughput can be reported without the padding (``perf/real_tokens_per_s``)."""
        lengths = [int(w.view1_wD.shape[0]) for w in windows]
        width = self.window_size if self.pad_to_window else max(lengths, default=0)
        return sum(lengths), width * len(lengths)

    def _assemble(self, cuts: list, generator: torch.Generator) -> Views:
        """Pad the cut windows to [B, W, D] (W: the longest window of the batch, or ``window_size`` with
        ``pad_to_window``), then noise and erasing per view (padding stays exactly 0)."""
        lengths = [min(info.num_tokens, self.window_size) for info, *_ in cuts]
        B, D = len(cuts), self.tokensize
        W = self.window_size if self.pad_to_window else max(lengths)
        view1 = torch.zeros(B, W, D)
        view2 = torch.zeros(B, W, D)
        mask = torch.zeros(B, W, D, dtype=torch.bool)
        positions = torch.zeros(B, W, 3, dtype=torch.long)
        for b, (info, s, v1_wD, v2_wD) in enumerate(cuts):
            w = lengths[b]
            view1[b, :w], view2[b, :w] = v1_wD, v2_wD
            mask[b, :w] = info.mask_ND[s:s + w]
            positions[b, :w] = info.positions_NP[s:s + w]
        dev = self.device
        view1, view2 = view1.to(dev), view2.to(dev)
        mask, positions = mask.to(dev), positions.to(dev)
        valid = torch.arange(W)[None, :] < torch.tensor(lengths)[:, None]
        view1 = self._noise(view1, mask, self.cfg.noise_view_1, generator)
        view2 = self._noise(view2, mask, self.cfg.noise_view_2, generator)
        if self.cfg.erase_prob > 0:
            view1 = self._erase(view1, generator)
            view2 = self._erase(view2, generator)
        return Views(view1, view2, mask, positions, valid.to(dev))

    def _randn(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    def _noise(self, x_BTD: torch.Tensor, mask_BTD: torch.Tensor, sigma: float, generator: torch.Generator
               ) -> torch.Tensor:
        if self.cfg.noise_mode == "none" or sigma <= 0:
            return x_BTD
        eps = self._randn(tuple(x_BTD.shape), generator)
        if self.cfg.noise_mode == "multiplicative":
            return x_BTD * (1.0 + sigma * eps)
        return torch.where(mask_BTD, x_BTD + sigma * eps, 0.0)

    def _erase(self, x_BTD: torch.Tensor, generator: torch.Generator,
               scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
        """torchvision-style RandomErasing over (window x token) as an image, per sample with erase_prob, value 0."""
        B, T, D = x_BTD.shape
        r = torch.rand(B, 5, generator=generator, device=generator.device).to(self.device)
        area = (scale[0] + (scale[1] - scale[0]) * r[:, 0]) * T * D
        aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[:, 1])
        h = torch.sqrt(area * aspect).round().clamp(1, T)
        w = torch.sqrt(area / aspect).round().clamp(1, D)
        top = ((T - h + 1) * r[:, 2]).floor()
        left = ((D - w + 1) * r[:, 3]).floor()
        rows = torch.arange(T, device=self.device)[None, :]
        cols = torch.arange(D, device=self.device)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        erase_BTD = in_rows[:, :, None] & in_cols[:, None, :] & (r[:, 4] < self.cfg.erase_prob)[:, None, None]
        return x_BTD.masked_fill(erase_BTD, 0.0)
