"""state_dict <-> tokens, the exact inverse of each other for a given ``TokenLayout`` (spec 1.1-1.3).

Why copies into one preallocated buffer: a ResNet-18 checkpoint is 11M floats; writing every row
straight into its padded slot avoids the per-layer pad/cat of the reference and keeps padding exactly 0.

Legend: N tokens in a whole model, D token width (= tokensize).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from mzsane.errors import DataError
from mzsane.tokens.layout import LayoutEntry, TokenLayout, layout_from_state_dict

__all__ = ["detokenize", "layout_from_state_dict", "tokenize", "tokens_of"]


def _rows_view(flat_ND: torch.Tensor, e: LayoutEntry, tokensize: int) -> torch.Tensor:
    """The [rows, chunks*D] view of one layer's tokens (rows are contiguous chunks)."""
    return flat_ND[e.first_token:e.first_token + e.num_tokens].view(e.rows, e.chunks * tokensize)


def _tensor(state_dict: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state_dict:
        raise DataError(f"checkpoint lacks {key!r} that the token layout needs; tokenize it with a layout built "
                        "from the same architecture (layout_from_state_dict)")
    t = state_dict[key]
    if tuple(t.shape) != tuple(shape):
        raise DataError(f"checkpoint entry {key!r} has shape {list(t.shape)} but the layout expects {list(shape)}; "
                        "use the layout of this checkpoint's architecture")
    return t


def tokenize(state_dict: Mapping[str, torch.Tensor], layout: TokenLayout) -> torch.Tensor:
    """Tokens float32 [N, D] of a checkpoint; padding is exactly 0 and the mask is ``layout.mask_ND``."""
    D = layout.tokensize
    tokens_ND = torch.zeros(layout.num_tokens, D, dtype=torch.float32)
    with torch.no_grad():
        for e in layout.entries:
            rows = _rows_view(tokens_ND, e, D)
            w = _tensor(state_dict, e.key, e.shape).detach()
            rows[:, :e.weight_len].copy_(w.reshape(e.rows, e.weight_len))
            if e.bias_key:
                rows[:, e.weight_len].copy_(_tensor(state_dict, e.bias_key, (e.rows,)).detach())
    return tokens_ND


def detokenize(tokens_ND: torch.Tensor, layout: TokenLayout,
               reference_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state_dict: token entries from ``tokens_ND``, every other entry cloned from the reference.

    Key order and dtypes follow the reference (a freshly built model of the architecture), so a float32
    checkpoint round-trips bit-exactly. Padding in ``tokens_ND`` is ignored.
    """
    D = layout.tokensize
    if tuple(tokens_ND.shape) != (layout.num_tokens, D):
        raise DataError(f"tokens have shape {list(tokens_ND.shape)} but layout {layout.layout_id} expects "
                        f"[{layout.num_tokens}, {D}]; pass the full model's tokens with its own layout")
    tokens_ND = tokens_ND.detach().to("cpu")
    values: dict[str, torch.Tensor] = {}
    for e in layout.entries:
        rows = _rows_view(tokens_ND, e, D)
        ref = _tensor(reference_state_dict, e.key, e.shape)
        values[e.key] = rows[:, :e.weight_len].reshape(e.shape).to(ref.dtype).clone()
        if e.bias_key:
            ref_b = _tensor(reference_state_dict, e.bias_key, (e.rows,))
            values[e.bias_key] = rows[:, e.weight_len].to(ref_b.dtype).clone()
    out = {}
    for key, ref in reference_state_dict.items():
        out[key] = values[key] if key in values else ref.detach().clone()
    missing = set(values) - set(out)
    assert not missing, f"layout keys missing from reference: {missing}"
    return out


def tokens_of(state_dict: Mapping[str, torch.Tensor], tokensize: int = 288, include_bn: bool = True,
              include_running_stats: bool = False) -> tuple[torch.Tensor, TokenLayout]:
    """Convenience: (tokens_ND, layout) of one checkpoint."""
    layout = layout_from_state_dict(state_dict, tokensize, include_bn, include_running_stats)
    return tokenize(state_dict, layout), layout
