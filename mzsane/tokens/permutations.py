"""Neuron-permutation symmetries of every registered architecture, applied fast in token space (spec 5.1).

Why: permuting hidden neurons (a layer's output channels together with its bias, its BatchNorm affine
params and running stats, and the next layer's input channels) leaves a network's function unchanged.
Training draws a fresh permutation per sample as the second contrastive view; alignment (weight matching)
uses the same groups to bring models into a common basis for soups and novelty.

A ``PermSpec`` names, for every state_dict key, the permutation group acting on axis 0 (outputs) and
axis 1 (inputs). Flatten block expansion needs no special case: when a Linear's inputs are ``G * b``
for an input group of size ``G``, each channel owns a block of ``b`` consecutive inputs. ResNets share
one group per stage across the residual stream (stem/shortcut/conv2/bn2 of that stage); block-internal
channels (conv1/bn1) are free. Final outputs are never permuted.

Token space: a permutation draw becomes a gather index ``[num, K]`` into flat tokens ``[N*D]`` plus one
trailing zero slot (index ``N*D``) that every padding slot reads, so padding stays exactly zero (the
reference's index maps read element 0 there). Indices are computed from per-token tables, so a window
(``token_ids``) costs only its own size, not the whole model.

Legend: N tokens in a whole model, D token width, K gathered slots, B batch, S concatenated group axes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from mzsane.errors import DataError
from mzsane.tokens.layout import TokenLayout

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class PermSpec:
    """Group sizes and, per key, the group acting on each axis (None = not permuted)."""

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]

    def members(self) -> dict[str, list[tuple[str, int]]]:
        """group -> [(key, axis)] it acts on."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for key, groups in self.axes.items():
            for axis, g in enumerate(groups):
                if g is not None:
                    out[g].append((key, axis))
        return out


def _finish(axes: dict[str, tuple[str | None, ...]], shapes: Shapes) -> PermSpec:
    sizes: dict[str, int] = {}
    for key, groups in axes.items():
        if groups and groups[0] is not None:
            size = int(shapes[key][0])
            assert sizes.setdefault(groups[0], size) == size, f"inconsistent size of group {groups[0]} at {key}"
    return PermSpec(sizes, {k: v for k, v in axes.items() if any(g is not None for g in v)})


def sequential_spec(shapes: Shapes) -> PermSpec:
    """Chain of conv/linear layers (cnn_s, cnn_l, mlp): layer i's outputs are layer i+1's inputs."""
    weights = [k for k in shapes if k.rsplit(".", 1)[-1] == "weight"]
    axes: dict[str, tuple[str | None, ...]] = {}
    prev: str | None = None
    for i, key in enumerate(weights):
        if len(shapes[key]) < 2 or (i > 0 and shapes[key][1] % shapes[weights[i - 1]][0]):
            raise DataError(f"{key} {list(shapes[key])} does not continue a plain conv/linear chain; "
                            "register a permutation spec family for this architecture")
        out = f"P{i}" if i < len(weights) - 1 else None
        axes[key] = (out, prev)
        module = key[: -len("weight")]
        for name in ("bias", "running_mean", "running_var"):
            if module + name in shapes:
                axes[module + name] = (out,)
        prev = out
    return _finish(axes, shapes)


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)$")


def resnet_spec(shapes: Shapes) -> PermSpec:
    """torchvision-named BasicBlock ResNets: one residual-stream group per stage, block inner groups free."""
    stages = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    stream: dict[int, str] = {}
    for s in stages:  # a stage without a projection shortcut continues the previous stage's stream
        has_proj = f"layer{s}.0.downsample.0.weight" in shapes
        stream[s] = stream[s - 1] if (s - 1 in stream and not has_proj) else f"stream{s}"
    first = stream[stages[0]] if stages else "stream1"
    axes: dict[str, tuple[str | None, ...]] = {}
    for key, shape in shapes.items():
        module, _, name = key.rpartition(".")
        if name == "num_batches_tracked":
            continue
        if module in ("conv1", "bn1"):
            axes[key] = (first, None) if len(shape) > 1 else (first,)
        elif module == "fc":
            axes[key] = (None, stream[stages[-1]] if stages else first) if len(shape) > 1 else (None,)
        elif m := _BLOCK.match(key):
            s, b, part = int(m.group(1)), int(m.group(2)), m.group(3)
            into = stream[s - 1] if (b == 0 and s - 1 in stream) else stream[s]
            if b == 0 and s == stages[0]:
                into = first
            inner = f"inner{s}.{b}"
            out = inner if part in ("conv1", "bn1") else stream[s]
            src = {"conv1": into, "conv2": inner, "downsample.0": into}.get(part)
            axes[key] = (out, src) if len(shape) > 1 else (out,)
        else:
            raise DataError(f"{key} is not a torchvision-style ResNet key; use an architecture whose permutation "
                            "spec family matches the checkpoint")
    return _finish(axes, shapes)


SPEC_FAMILIES: dict[str, Callable[[Shapes], PermSpec]] = {"sequential": sequential_spec, "resnet": resnet_spec}


def spec_builder(arch: str | Callable[[Shapes], PermSpec]) -> Callable[[Shapes], PermSpec]:
    """The spec builder of a registered architecture name (or a builder passed through)."""
    if callable(arch):
        return arch
    from mzsane.zoo.architectures import get_architecture

    return SPEC_FAMILIES[get_architecture(arch).perm_family]


def layout_shapes(layout: TokenLayout) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor stored in tokens."""
    shapes: dict[str, tuple[int, ...]] = {}
    for e in layout.entries:
        shapes[e.key] = tuple(e.shape)
        if e.bias_key:
            shapes[e.bias_key] = (e.rows,)
    return shapes


def permute_tensor(t: torch.Tensor, groups: tuple[str | None, ...], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """new[i, j*b + s] = old[p_out[i], p_in[j]*b + s]: the gather convention used everywhere here."""
    if groups[0] is not None:
        t = t.index_select(0, perms[groups[0]])
    if len(groups) > 1 and groups[1] is not None:
        p = perms[groups[1]]
        t = t.reshape(t.shape[0], p.numel(), -1).index_select(1, p).reshape(t.shape)
    return t


class Permuter:
    """Draws and applies function-preserving permutations for one (architecture, layout)."""

    def __init__(self, arch: str | PermSpec | Callable[[Shapes], PermSpec], layout: TokenLayout):
        self.layout = layout
        self._builder = None if isinstance(arch, PermSpec) else spec_builder(arch)
        self.spec = arch if isinstance(arch, PermSpec) else self._builder(layout_shapes(layout))
        self.groups = sorted(self.spec.sizes)
        self._offsets = {}
        total = 0
        for g in self.groups:
            self._offsets[g] = total
            total += self.spec.sizes[g]
        self._group_total = total
        self._build_tables()

    # ---------------------------------------------------------------------------- precompute
    def _build_tables(self) -> None:
        """Per-entry and per-token tables so any set of tokens gets its index by pure tensor ops."""
        D, lay = self.layout.tokensize, self.layout
        ent = {name: [] for name in ("base", "rowstride", "wl", "bias", "inner", "out_off", "in_off")}
        ident_total, fixed = self._group_total, []
        for e in lay.entries:
            groups = self.spec.axes.get(e.key, (None,))
            g_out = groups[0]
            g_in = groups[1] if len(groups) > 1 else None
            if g_out is None:  # identity segment appended after the groups
                out_off, ident_total = ident_total, ident_total + e.rows
                fixed.append(torch.arange(e.rows))
            else:
                out_off = self._offsets[g_out]
            if g_in is not None:
                size = self.spec.sizes[g_in]
                if e.weight_len % size:
                    raise DataError(f"permutation group {g_in} (size {size}) does not divide inputs of {e.key}; "
                                    "the permutation spec does not fit this architecture")
                inner, in_off = e.weight_len // size, self._offsets[g_in]
            else:
                inner, in_off = 1, -1
            vals = (e.first_token * D, e.chunks * D, e.weight_len, int(bool(e.bias_key)), inner, out_off, in_off)
            for name, v in zip(ent, vals):
                ent[name].append(v)
        self._entry = {k: torch.tensor(v, dtype=torch.int64) for k, v in ent.items()}
        self._fixed = torch.cat(fixed) if fixed else torch.zeros(0, dtype=torch.int64)
        tok_entry = torch.empty(lay.num_tokens, dtype=torch.int64)
        tok_row = torch.empty(lay.num_tokens, dtype=torch.int64)
        tok_chunk = torch.empty(lay.num_tokens, dtype=torch.int64)
        for i, e in enumerate(lay.entries):
            span = slice(e.first_token, e.first_token + e.num_tokens)
            tok_entry[span] = i
            local = torch.arange(e.num_tokens)
            tok_row[span] = local // e.chunks
            tok_chunk[span] = local % e.chunks
        self._tok = (tok_entry, tok_row, tok_chunk)
        self._arange_D = torch.arange(D, dtype=torch.int64)

    # --------------------------------------------------------------------------------- draws
    def random_perms(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One uniform permutation per group from ``generator`` (same seed, same draw)."""
        return {g: torch.randperm(self.spec.sizes[g], generator=generator) for g in self.groups}

    def identity_perms(self) -> dict[str, torch.Tensor]:
        return {g: torch.arange(self.spec.sizes[g]) for g in self.groups}

    def is_identity(self, perms: Mapping[str, torch.Tensor]) -> bool:
        """True when a draw changes nothing (augment uses it to keep view 2 != canonical)."""
        return all(torch.equal(perms[g], torch.arange(self.spec.sizes[g])) for g in self.groups)

    @property
    def can_permute(self) -> bool:
        """False when the architecture has no group larger than one (every draw is the identity)."""
        return any(s > 1 for s in self.spec.sizes.values())

    def _flat_perms(self, perms_list: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """[num, S]: all groups' permutations concatenated, then identity segments for fixed outputs."""
        rows = [torch.cat([*(p[g].to(torch.int64) for g in self.groups), self._fixed]) for p in perms_list]
        return torch.stack(rows)

    def index_from_perms(self, perms_list: list[Mapping[str, torch.Tensor]],
                         token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Gather index [num, T*D] into flat tokens [N*D + 1] (slot N*D is the zero sentinel)."""
        D, N = self.layout.tokensize, self.layout.num_tokens
        flat_S = self._flat_perms(perms_list)  # [num, S]
        if token_ids is None:
            return self._full_index(flat_S)
        token_ids = token_ids.to(torch.int64)
        tok_entry, tok_row, tok_chunk = (table[token_ids] for table in self._tok)
        t = {k: v[tok_entry][:, None] for k, v in self._entry.items()}  # each [T, 1]
        col_TD = tok_chunk[:, None] * D + self._arange_D  # column within the padded row
        src_row = flat_S[:, t["out_off"] + tok_row[:, None]]  # [num, T, 1]
        is_w = col_TD < t["wl"]
        j = torch.where(is_w, col_TD // t["inner"], 0)
        s = col_TD - j * t["inner"]
        has_in = (t["in_off"] >= 0) & is_w
        perm_j = flat_S[:, torch.where(has_in, t["in_off"] + j, 0)]  # [num, T, D]
        src_col = torch.where(has_in, perm_j * t["inner"] + s, col_TD)
        index = t["base"] + src_row * t["rowstride"] + src_col
        valid = is_w | ((col_TD == t["wl"]) & (t["bias"] == 1))
        index = torch.where(valid, index, N * D)
        return index.reshape(len(perms_list), -1)

    def _full_index(self, flat_S: torch.Tensor) -> torch.Tensor:
        """The whole-model index, layer by layer (broadcast rows x columns; ~10x faster than per slot)."""
        D, N, num = self.layout.tokensize, self.layout.num_tokens, flat_S.shape[0]
        index = torch.full((num, N * D), N * D, dtype=torch.int64)
        e_tab = {k: v.tolist() for k, v in self._entry.items()}
        for i, e in enumerate(self.layout.entries):
            base, stride, wl, inner = e_tab["base"][i], e_tab["rowstride"][i], e_tab["wl"][i], e_tab["inner"][i]
            out_off, in_off = e_tab["out_off"][i], e_tab["in_off"][i]
            rows = base + flat_S[:, out_off:out_off + e.rows] * stride  # [num, rows]
            block = index[:, base:base + e.rows * stride].view(num, e.rows, stride)
            if in_off >= 0:
                cols = (flat_S[:, in_off:in_off + wl // inner, None] * inner + torch.arange(inner)).reshape(num, wl)
            else:
                cols = torch.arange(wl).expand(num, wl)
            block[:, :, :wl] = rows[:, :, None] + cols[:, None, :]
            if e_tab["bias"][i]:
                block[:, :, wl] = rows + wl
        return index

    def sample_index(self, generator: torch.Generator, num: int = 1, token_ids: torch.Tensor | None = None,
                     avoid_identity: bool = False) -> torch.Tensor:
        """LongTensor [num, T*D] (T = N without ``token_ids``): one fresh random permutation per row.

        ``avoid_identity`` redraws identity draws (possible only when ``can_permute``).
        """
        draws = []
        for _ in range(num):
            perms = self.random_perms(generator)
            while avoid_identity and self.can_permute and self.is_identity(perms):
                perms = self.random_perms(generator)
            draws.append(perms)
        return self.index_from_perms(draws, token_ids)

    @staticmethod
    def apply(tokens_BND: torch.Tensor, index_BK: torch.Tensor) -> torch.Tensor:
        """Permuted tokens [B, K/D, D]; ``tokens_BND`` may be [N, D] (shared) and the index [K] or [B, K]."""
        if tokens_BND.dim() == 2:
            tokens_BND = tokens_BND.unsqueeze(0)
        if index_BK.dim() == 1:
            index_BK = index_BK.unsqueeze(0)
        B, N, D = tokens_BND.shape
        flat = torch.cat([tokens_BND.reshape(B, N * D), tokens_BND.new_zeros(B, 1)], dim=1)
        if B == 1 and index_BK.shape[0] > 1:
            flat = flat.expand(index_BK.shape[0], -1)
        return torch.gather(flat, 1, index_BK.to(flat.device)).reshape(index_BK.shape[0], -1, D)

    # --------------------------------------------------------------------------- state dicts
    def spec_for(self, state_dict: Mapping[str, torch.Tensor]) -> PermSpec:
        """The spec over a full state_dict (running stats included even if not tokenized)."""
        if self._builder is None:
            return self.spec
        return self._builder({k: tuple(v.shape) for k, v in state_dict.items()})

    def permute_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                           perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A permuted copy; keys outside the spec (num_batches_tracked) are copied unchanged."""
        return permute_state_dict(state_dict, perms, self.spec_for(state_dict))

    def align(self, state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
              max_iter: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
        """``state_dict`` permuted into ``reference``'s basis (weight matching, see ``match_weights``)."""
        spec = self.spec_for(state_dict)
        perms = match_weights(state_dict, reference, spec, max_iter=max_iter, seed=seed)
        return permute_state_dict(state_dict, perms, spec)


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
                       spec: PermSpec) -> dict[str, torch.Tensor]:
    """Apply ``perms`` (group -> LongTensor) to every key the spec covers; other keys are cloned."""
    return {k: (permute_tensor(v, spec.axes[k], perms) if k in spec.axes else v).clone()
            for k, v in state_dict.items()}


# ------------------------------------------------------------------------------ weight matching


def linear_sum_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square matrix: ``col[i]`` assigned to row ``i``.

    Exact Hungarian algorithm (shortest augmenting paths with potentials, O(n^3)), with the inner scan
    vectorized in numpy; ~1 s for n=512. scipy is not a dependency, hence this small implementation.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    assert cost.shape == (n, n), "square cost matrix expected"
    INF = np.inf
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)  # p[j]: row matched to column j (1-based; 0 = free)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(n + 1, INF)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], INF)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            used_idx = np.nonzero(used)[0]
            u[p[used_idx]] += delta
            v[used_idx] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[p[1:] - 1] = np.arange(n)
    return col


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
            new = torch.from_numpy(linear_sum_assignment(-score.numpy()))
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


__all__ = ["PermSpec", "Permuter", "align", "linear_sum_assignment", "match_weights", "permute_state_dict",
           "resnet_spec", "sequential_spec", "spec_builder", "SPEC_FAMILIES"]
