"""Neuron-permutation symmetries applied fast in token space: the second contrastive view (spec 5.1).

Why: training draws a fresh function-preserving permutation per sample (the groups of
``symmetries.py``), so applying one must cost a gather, not a detokenize/permute/tokenize round trip.

Token space: a permutation draw becomes a gather index ``[num, K]`` into flat tokens ``[N*D]`` plus one
trailing zero slot (index ``N*D``) that every padding slot reads, so padding stays exactly zero (the
reference's index maps read element 0 there). Indices are computed from per-token tables, so a window
(``token_ids``) costs only its own size, not the whole model.

Legend: N tokens in a whole model, D token width, K gathered slots, B batch, S concatenated group axes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mzsane.errors import DataError
from mzsane.tokens.alignment import match_weights
from mzsane.tokens.layout import TokenLayout
from mzsane.tokens.symmetries import PermSpec, Shapes, permute_state_dict, spec_builder


def layout_shapes(layout: TokenLayout) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor stored in tokens."""
    shapes: dict[str, tuple[int, ...]] = {}
    for e in layout.entries:
        shapes[e.key] = tuple(e.shape)
        if e.bias_key:
            shapes[e.bias_key] = (e.rows,)
    return shapes


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


__all__ = ["Permuter"]
