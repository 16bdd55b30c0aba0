"""Noise-free reconstruction, decode(encode(m)), layer by layer: the Figure-2 view of the loss normalizations.

Why: the MZ-SANE paper motivates masked per-token loss normalization with per-layer weight histograms of a
ResNet, original against reconstructed: without normalization the small-scale layers collapse to ~0, a
single (batch) statistic favours the layers that dominate it, and BatchNorm layers (weights ~1, biases ~0)
are where the schemes part. This module reconstructs held-out models of a zoo through one or more
backbones and reports, per layer, the relative error and the two histograms, so that view is measured here
rather than quoted. ``mzsane bench norm`` trains one backbone per normalization mode on a ResNet zoo and
calls ``figure`` (plot) and ``layer_errors`` (numbers).

Legend: M models, N tokens per model, D token width, L latent width.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mzsane import storage
from mzsane.model import halo


def reconstruct(backbone: torch.nn.Module, state_dicts: list[dict[str, torch.Tensor]], tokens_cfg: Any,
                halo_window: int, halo_size: int, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """decode(encode(m)) for every model, detokenized onto the model itself (keys outside tokens unchanged)."""
    from mzsane.tokens.layout import layout_from_state_dict
    from mzsane.tokens.tokenize import detokenize, tokenize

    layout = layout_from_state_dict(state_dicts[0], tokensize=tokens_cfg.tokensize, include_bn=tokens_cfg.include_bn,
                                    include_running_stats=tokens_cfg.include_running_stats)
    tokens_MND = torch.stack([tokenize(sd, layout) for sd in state_dicts])
    plan = halo.plan(layout.num_tokens, halo_window, halo_size)
    backbone = backbone.eval()
    z_MNL = halo.encode(backbone, tokens_MND, layout.positions_NP, plan, batch_size)
    out_MND = halo.decode(backbone, z_MNL, layout.positions_NP, plan, batch_size).mul_(layout.mask_ND)
    return [detokenize(t_ND, layout, sd) for t_ND, sd in zip(out_MND, state_dicts)]


def layer_kind(key: str, state_dict: dict[str, torch.Tensor]) -> str:
    """conv | bn_weight | bn_bias | linear | bias: the groups the normalizations treat differently."""
    prefix = key.rsplit(".", 1)[0]
    is_bn = f"{prefix}.running_mean" in state_dict
    if is_bn:
        return "bn_weight" if key.endswith("weight") else "bn_bias"
    if key.endswith("bias"):
        return "bias"
    return "conv" if state_dict[key].dim() == 4 else "linear"


def token_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state_dict.items() if v.is_floating_point() and not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]


def layer_errors(originals: list[dict], reconstructed: list[dict]) -> dict[str, Any]:
    """Per layer and per kind: relative error ||rec - orig||^2 / ||orig - mean(orig)||^2 (1 - R^2), pooled over
    models, plus the mean and std of both value sets (a collapsed layer shows as a tiny reconstructed std)."""
    per_layer = {}
    for key in token_keys(originals[0]):
        o = torch.cat([sd[key].float().reshape(-1) for sd in originals])
        r = torch.cat([sd[key].float().reshape(-1) for sd in reconstructed])
        denom = float((o - o.mean()).square().sum().clamp_min(1e-20))
        per_layer[key] = {"kind": layer_kind(key, originals[0]), "rel_error": float((r - o).square().sum()) / denom,
                          "orig_mean": float(o.mean()), "orig_std": float(o.std()), "rec_mean": float(r.mean()),
                          "rec_std": float(r.std()), "num_values": int(o.numel())}
    kinds: dict[str, list[float]] = {}
    for v in per_layer.values():
        kinds.setdefault(v["kind"], []).append(v["rel_error"])
    return {"layers": per_layer, "kinds": {k: float(np.median(v)) for k, v in sorted(kinds.items())}}


def pick_layers(state_dict: dict[str, torch.Tensor], max_layers: int = 6) -> list[str]:
    """A few layers of each kind, spread over depth: what the Figure-2 grid shows."""
    by_kind: dict[str, list[str]] = {}
    for key in token_keys(state_dict):
        by_kind.setdefault(layer_kind(key, state_dict), []).append(key)
    picked = []
    for kind in ("conv", "bn_weight", "bn_bias", "linear"):
        keys = by_kind.get(kind, [])
        if keys:
            picked.extend(dict.fromkeys([keys[0], keys[len(keys) // 2]]))
    return picked[:max_layers] if len(picked) > max_layers else picked


def figure(originals: list[dict], reconstructions: dict[str, list[dict]], out_url: str, title: str = "") -> str:
    """Grid: one row per picked layer, one column per mode; original (grey) vs reconstructed histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = pick_layers(originals[0])
    modes = list(reconstructions)
    fig, axes = plt.subplots(len(keys), len(modes), figsize=(3.0 * len(modes), 1.9 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        o = torch.cat([sd[key].float().reshape(-1) for sd in originals]).numpy()
        for j, mode in enumerate(modes):
            r = torch.cat([sd[key].float().reshape(-1) for sd in reconstructions[mode]]).numpy()
            lo, hi = float(min(o.min(), np.nanmin(r))), float(max(o.max(), np.nanmax(r)))
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
            ax = axes[i][j]
            ax.hist(o, bins=bins, color="0.6", alpha=0.7, label="original")
            ax.hist(r, bins=bins, histtype="step", color="C3", linewidth=1.4, label="reconstructed")
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(mode, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{key}\n({layer_kind(key, originals[0])})", fontsize=7)
    axes[0][0].legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return storage.write_figure(out_url, fig)
