"""Where every weight of a checkpoint sits in the token sequence (spec section 1), from shapes alone.

Why a separate layout object: shards store only tokens; training needs mask and positions, sampling needs
the inverse, augmentation needs row/column structure. All of these follow from the key order and shapes,
so a ``TokenLayout`` is computed once per architecture, stored as JSON in the shard manifest, and
identified by a stable ``layout_id``.

Rules (reference ``tokenize_checkpoint``, with its bugs fixed):
* keys are visited in state_dict order; a key whose last dotted component is ``weight`` starts a layer;
  its bias is the same key with the trailing ``weight`` replaced by ``bias`` (exact, not substring);
* a weight ``[O, ...]`` becomes rows ``[O, prod(rest)]`` (1-D BN weights become ``[C, 1]``), the bias is
  appended as the last column, each row is zero-padded to ``chunks * tokensize`` and cut into ``chunks``
  consecutive tokens;
* BatchNorm affine params are layers unless ``include_bn=False`` (the reference ``ignore_bn`` filter:
  names with ``bn``/``downsample.1``/``batchnorm``/``normalization``, or any module with running stats);
* ``running_mean``/``running_var`` become extra 1-column layers (in key order) only when
  ``include_running_stats=True``; ``num_batches_tracked`` never does;
* tokensize is explicit (no buggy discovery).

Legend: N tokens in a whole model, D token width (= tokensize), P position axes (3: token, layer, row).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from mzsane.errors import DataError

LAYOUT_VERSION = 1
_BN_NAME_PARTS = ("bn", "downsample.1", "batchnorm", "normalization")
_RUNNING_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class LayoutEntry:
    """One tokenized layer: a weight (or running stat) key, its optional bias, and its token span."""

    key: str
    shape: tuple[int, ...]
    bias_key: str  # "" when the layer has no bias column
    layer: int  # position axis 1
    rows: int  # output channels = position axis 2 range
    row_len: int  # prod(shape[1:]) + (1 if bias)
    chunks: int  # tokens per row = ceil(row_len / tokensize)
    first_token: int

    @property
    def weight_len(self) -> int:
        return self.row_len - (1 if self.bias_key else 0)

    @property
    def num_tokens(self) -> int:
        return self.rows * self.chunks


@dataclass(frozen=True)
class TokenLayout:
    """The token layout of one architecture at one tokensize; JSON round-trips via to_dict/from_dict.

    ``positions_NP`` and ``mask_ND`` are computed once and cached; treat them as read-only.
    """

    tokensize: int
    include_bn: bool
    include_running_stats: bool
    entries: tuple[LayoutEntry, ...]
    num_tokens: int
    num_layers: int
    max_rows: int
    version: int = field(default=LAYOUT_VERSION)

    # ----------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        d = asdict(self)
        d["entries"] = [{**e, "shape": list(e["shape"])} for e in d["entries"]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TokenLayout:
        if int(d.get("version", LAYOUT_VERSION)) > LAYOUT_VERSION:
            raise DataError(f"token layout version {d['version']} is newer than this mzsane ({LAYOUT_VERSION}); "
                            "upgrade mzsane")
        entries = tuple(LayoutEntry(**{**e, "shape": tuple(int(s) for s in e["shape"])}) for e in d["entries"])
        return cls(int(d["tokensize"]), bool(d["include_bn"]), bool(d["include_running_stats"]), entries,
                   int(d["num_tokens"]), int(d["num_layers"]), int(d["max_rows"]), int(d.get("version", 1)))

    @cached_property
    def layout_id(self) -> str:
        """Stable across processes and machines: a hash of the canonical JSON of the layout."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---------------------------------------------------------------------------------- tensors
    @property
    def num_valid(self) -> int:
        """Real weight entries (mask density numerator)."""
        return sum(e.rows * e.row_len for e in self.entries)

    @cached_property
    def positions_NP(self) -> torch.Tensor:
        """int32 [N, 3]: (global token index, layer index, row index; chunks of a row share the row)."""
        pos = torch.empty(self.num_tokens, 3, dtype=torch.int32)
        pos[:, 0] = torch.arange(self.num_tokens, dtype=torch.int32)
        for e in self.entries:
            span = slice(e.first_token, e.first_token + e.num_tokens)
            pos[span, 1] = e.layer
            pos[span, 2] = torch.arange(e.rows, dtype=torch.int32).repeat_interleave(e.chunks)
        return pos

    @cached_property
    def mask_ND(self) -> torch.Tensor:
        """bool [N, D]: true where a real weight or bias sits, false on padding."""
        mask = torch.zeros(self.num_tokens, self.tokensize, dtype=torch.bool)
        for e in self.entries:
            rows = mask[e.first_token:e.first_token + e.num_tokens].view(e.rows, e.chunks * self.tokensize)
            rows[:, :e.row_len] = True
        return mask

    @property
    def max_positions(self) -> list[int]:
        """Smallest embedding-table sizes that cover this layout: [tokens, layers, rows]."""
        return [self.num_tokens, self.num_layers, self.max_rows]

    def check_max_positions(self, max_positions: Sequence[int]) -> None:
        """Raise DataError when a position axis exceeds the model's embedding table."""
        names = ("token", "layer", "row")
        for name, need, have in zip(names, self.max_positions, max_positions):
            if need > int(have):
                raise DataError(
                    f"layout {self.layout_id} needs {name} positions < {need} but max_positions allows {have}; "
                    f"raise model max_positions to >= {self.max_positions} or use a larger tokensize "
                    f"(now {self.tokensize})")

    def token_keys(self) -> list[str]:
        """Every state_dict key whose values live in tokens (weights, biases, included running stats)."""
        keys = []
        for e in self.entries:
            keys.append(e.key)
            if e.bias_key:
                keys.append(e.bias_key)
        return keys


def _is_bn(key: str, keys: set[str]) -> bool:
    module = key.rsplit(".", 1)[0] if "." in key else ""
    has_stats = f"{module}.running_mean" in keys if module else "running_mean" in keys
    return has_stats or any(part in key for part in _BN_NAME_PARTS)


def _bias_key(key: str) -> str:
    return key[: -len("weight")] + "bias"


def layout_from_shapes(shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]], tokensize: int = 288,
                       include_bn: bool = True, include_running_stats: bool = False) -> TokenLayout:
    """Build the layout from an ordered key -> shape mapping (state_dict order)."""
    if int(tokensize) < 1:
        raise DataError(f"tokensize={tokensize}; set tokens.tokensize to a positive integer (288 is the default)")
    items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
    shape_of = {k: tuple(int(s) for s in v) for k, v in items}
    keys = set(shape_of)
    entries: list[LayoutEntry] = []
    first = 0
    for key, shape in shape_of.items():
        last = key.rsplit(".", 1)[-1]
        is_weight = last == "weight"
        is_stat = last in _RUNNING_STATS
        if not (is_weight or (is_stat and include_running_stats)) or len(shape) == 0:
            continue
        if is_weight and not include_bn and _is_bn(key, keys):
            continue
        bias = _bias_key(key) if is_weight and _bias_key(key) in keys else ""
        if bias and shape_of[bias] != (shape[0],):
            raise DataError(f"bias {bias} has shape {list(shape_of[bias])}, expected [{shape[0]}]; "
                            "the checkpoint is corrupt or not a plain conv/linear/BN net")
        row_len = math.prod(shape[1:]) + (1 if bias else 0)
        chunks = math.ceil(row_len / tokensize)
        entries.append(LayoutEntry(key, shape, bias, len(entries), shape[0], row_len, chunks, first))
        first += shape[0] * chunks
    if not entries:
        raise DataError("state_dict has no '<module>.weight' keys to tokenize; pass a conv/linear network checkpoint")
    return TokenLayout(int(tokensize), bool(include_bn), bool(include_running_stats), tuple(entries), first,
                       len(entries), max(e.rows for e in entries))


def layout_from_state_dict(state_dict: Mapping[str, torch.Tensor], tokensize: int = 288, include_bn: bool = True,
                           include_running_stats: bool = False) -> TokenLayout:
    """The layout of a checkpoint (spec 1.1/1.2); only key order and shapes are read."""
    return layout_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, tokensize, include_bn,
                              include_running_stats)
