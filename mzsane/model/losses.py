"""SANE losses (spec section 4): masked, normalized reconstruction and NT-Xent, gamma-weighted.

Why masked normalization: weights of different layers and architectures differ in scale by orders of
magnitude, and windows of short models are padded. The reconstruction error is therefore taken over the
valid (unmasked) entries only, and divided by a scale computed from the *targets* (data: no gradient flows
through the statistics). Modes (``LossConfig.norm_mode``):

* ``batch``  the reference: one mean/std over every valid entry of the batch (both views), eps added to
             the std, so the loss is masked MSE / (sigma + eps)^2.
* ``token``  masked per-token normalization, as the MZ-SANE paper's name for it reads (the reference code's
             ``MaskedReconLoss`` and the follow-up paper use one statistic per batch: ``batch``): mean/std of
             each token over its own valid entries. A token with fewer than ``min_valid_per_token`` valid
             entries (every BatchNorm token: weight and bias of one channel) or a (numerically) constant one
             has no usable statistics of its own; each of its entries is then normalized by the masked std of
             *the same entry across its layer's tokens* (a BN weight against the other channels' weights of
             that layer, its bias against their biases) in the same sample, then across the batch; only where
             those are unusable by the std of its layer (in the sample, then across the batch), and last by
             the batch's. Why per entry: a BN token's two values sit near 1 and near 0, so any statistic
             pooled over both entries (the token's, or its layer's) measures that offset (~0.5), not how the
             weights vary between channels and models (~0.05-0.2), and its reconstruction errors were weighted
             ~70x below the conv weights'. No token gets a near-zero denominator and a 1e8 weight.
* ``token_unmasked`` the naive per-token normalization the masked one fixes (ablation, Figure 2): each
             token's std over all D entries, zero padding included, so a BN token's 2 values among 286 zeros
             get a tiny std; only an all-zero token falls back to the batch std.
* ``layer``  mean/std per (sample, layer index) over the valid entries of that layer's tokens in the
             window; groups too small or constant fall back to the same layer across the batch, then the batch.
* ``none``   plain masked MSE.

``LossConfig.reduction`` then averages the normalized squared errors over every valid entry (``entry``, the
default: a token weighs as many entries as it has) or per token first (``token``: every token weighs the
same). ``token_unmasked`` does the latter implicitly (its padded std scales a token with n valid entries by
~288/n); done explicitly with masked statistics it hands the loss to the BN tokens (half of a small
ResNet's tokens) and the conv layers collapse (``mzsane bench norm``), so it is an ablation, not a default.
Two weightings sit between those ends (issue 25.3: short rows, the first conv's 9 weights, a 1x1 conv's few,
are under-weighted by ``entry`` and BN tokens over-weighted by ``token``):

* ``token_power`` each token's mean error weighted by n^alpha (n its valid entries, alpha
                  ``LossConfig.token_weight_alpha``): alpha 0 is ``token``, alpha 1 is ``entry``, 0.5 gives a
                  2-entry BN token 1/12 of a 288-entry conv token's weight instead of 1 or 1/144.
* ``layer``       every (sample, layer) group of the window weighs the same, its entries equally within it:
                  a layer's share does not depend on how its weights are cut into rows, nor on how many
                  channels (BN tokens) it has.

Shape legend: B batch, T tokens in window, D token width, F projection width, N = 2B rows in NT-Xent.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mzsane.config import LossConfig
from mzsane.errors import ConfigError

NORM_MODES = ("batch", "token", "token_unmasked", "layer", "none")


def _masked_batch_std(target_BTD: torch.Tensor, mask_BTD: torch.Tensor) -> torch.Tensor:
    """Population std of the targets over all valid entries (0 if there are none)."""
    n = mask_BTD.sum().clamp_min(1)
    mean = torch.where(mask_BTD, target_BTD, 0.0).sum() / n
    return (torch.where(mask_BTD, target_BTD - mean, 0.0).square().sum() / n).sqrt()


def _grouped_std(target_BTD: torch.Tensor, mask_BTD: torch.Tensor, group_BT: torch.Tensor, num_groups: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group population std over valid entries (two passes) and the valid count, both gathered per token."""
    count_BT = mask_BTD.sum(-1).to(target_BTD.dtype)
    flat_group = group_BT.reshape(-1)
    count_G = torch.zeros(num_groups, dtype=target_BTD.dtype, device=target_BTD.device)
    count_G.index_add_(0, flat_group, count_BT.reshape(-1))
    sums_BT = torch.where(mask_BTD, target_BTD, 0.0).sum(-1)
    sum_G = torch.zeros_like(count_G).index_add_(0, flat_group, sums_BT.reshape(-1))
    mean_BT = (sum_G / count_G.clamp_min(1))[group_BT]
    sq_BT = torch.where(mask_BTD, target_BTD - mean_BT[..., None], 0.0).square().sum(-1)
    var_G = torch.zeros_like(count_G).index_add_(0, flat_group, sq_BT.reshape(-1)) / count_G.clamp_min(1)
    return var_G.sqrt()[group_BT], count_G[group_BT]


def _layer_column_std(target_BTD: torch.Tensor, mask_BTD: torch.Tensor, layer_BT: torch.Tensor, num_layers: int
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Masked population std and count of each (layer, column) entry group, per sample and across the batch,
    both gathered per entry [B, T, D]: ((std, count) in the sample, (std, count) across the batch).

    Sums per group are one-hot matmuls over the window ([B, L, T] x [B, T, D]), which on CPU is ~10x faster
    than scattering every entry with index_add; two passes (mean, then squared deviations) keep it exact."""
    onehot_BTL = F.one_hot(layer_BT, num_layers).to(target_BTD.dtype)
    valid_BTD = mask_BTD.to(target_BTD.dtype)
    x_BTD = torch.where(mask_BTD, target_BTD, 0.0)

    def per_group(values_BTD: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btl,btd->bld", onehot_BTL, values_BTD)

    def gather(stat_BLD: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btl,bld->btd", onehot_BTL, stat_BLD)

    count_BLD, sum_BLD = per_group(valid_BTD), per_group(x_BTD)
    out = []
    for count, total in ((count_BLD, sum_BLD), (count_BLD.sum(0, keepdim=True).expand_as(count_BLD),
                                                 sum_BLD.sum(0, keepdim=True).expand_as(sum_BLD))):
        mean_BTD = gather(total / count.clamp_min(1))
        sq_BLD = per_group(torch.where(mask_BTD, target_BTD - mean_BTD, 0.0).square())
        if count is not count_BLD:  # across the batch
            sq_BLD = sq_BLD.sum(0, keepdim=True).expand_as(sq_BLD)
        out.append((gather((sq_BLD / count.clamp_min(1)).sqrt()), gather(count)))
    return out[0], out[1]


@torch.no_grad()
def normalization_scale(target_BTD: torch.Tensor, mask_BTD: torch.Tensor, mode: str, eps: float,
                        layer_BT: torch.Tensor | None = None, min_valid_per_token: int = 3) -> torch.Tensor:
    """The divisor s (std + eps): a scalar for ``batch``/``none``, per token [B, T] for ``layer`` and
    ``token_unmasked``, per entry [B, T, D] for ``token``; targets are data."""
    if mode not in NORM_MODES:
        raise ConfigError(f"loss.norm_mode '{mode}' is unknown; use one of {', '.join(NORM_MODES)}")
    mask_BTD = mask_BTD.bool()
    if mode == "none":
        return torch.ones((), dtype=target_BTD.dtype, device=target_BTD.device)
    batch_std = _masked_batch_std(target_BTD, mask_BTD)
    if mode == "batch":
        return batch_std + eps
    B, T, _ = target_BTD.shape
    if mode == "token_unmasked":
        std_BT = target_BTD.std(-1, unbiased=False)  # padding zeros included: the ablation
        return torch.where(std_BT < eps, batch_std, std_BT) + eps
    if layer_BT is None:
        raise ConfigError(f"loss.norm_mode '{mode}' needs the layer index of every token (positions[..., 1])")
    layer_BT = layer_BT.long()
    num_layers = int(layer_BT.max()) + 1 if layer_BT.numel() else 1
    sample_layer_BT = torch.arange(B, device=target_BTD.device)[:, None] * num_layers + layer_BT
    # fallback chain, coarsest last: the layer across the whole batch, then the batch itself
    std_BT, count_BT = _grouped_std(target_BTD, mask_BTD, layer_BT, num_layers)
    scale_BT = torch.where((count_BT < min_valid_per_token) | (std_BT < eps), batch_std, std_BT)
    std_BT, count_BT = _grouped_std(target_BTD, mask_BTD, sample_layer_BT, B * num_layers)
    scale_BT = torch.where((count_BT < min_valid_per_token) | (std_BT < eps), scale_BT, std_BT)
    if mode == "layer":
        return scale_BT + eps
    # token mode. Entries of tokens without usable statistics of their own: the same entry (column) across the
    # layer's tokens, in the sample, else across the batch, else the layer chain above
    (sample_std, sample_count), (batch_std_BTD, batch_count) = _layer_column_std(target_BTD, mask_BTD, layer_BT,
                                                                                num_layers)
    scale_BTD = scale_BT[..., None].expand_as(target_BTD)
    for std_BTD, count_BTD in ((batch_std_BTD, batch_count), (sample_std, sample_count)):
        scale_BTD = torch.where((count_BTD < min_valid_per_token) | (std_BTD < eps), scale_BTD, std_BTD)
    token_BT = torch.arange(B * T, device=target_BTD.device).view(B, T)
    std_BT, count_BT = _grouped_std(target_BTD, mask_BTD, token_BT, B * T)
    own_BT = (count_BT >= min_valid_per_token) & (std_BT >= eps)
    return torch.where(own_BT[..., None], std_BT[..., None], scale_BTD) + eps


REDUCTIONS = ("entry", "token", "token_power", "layer")


def reconstruction_loss(pred_BTD: torch.Tensor, target_BTD: torch.Tensor, mask_BTD: torch.Tensor, mode: str,
                        eps: float, layer_BT: torch.Tensor | None = None, min_valid_per_token: int = 3,
                        reduction: str = "entry", token_weight_alpha: float = 0.5) -> torch.Tensor:
    """((pred - target) / s)^2 averaged over valid entries (``entry``), or over each token's valid entries and
    then over the tokens that have any, each token weighing the same (``token``) or n^alpha (``token_power``),
    or over each (sample, layer) group's valid entries and then over the groups (``layer``); entries with
    mask 0 never reach value or gradient."""
    if reduction not in REDUCTIONS:
        raise ConfigError(f"loss.reduction '{reduction}' is unknown; use one of {', '.join(REDUCTIONS)}")
    if reduction == "layer" and layer_BT is None:
        raise ConfigError("loss.reduction 'layer' needs the layer index of every token (positions[..., 1])")
    mask_BTD = mask_BTD.bool()
    scale = normalization_scale(target_BTD, mask_BTD, mode, eps, layer_BT, min_valid_per_token)
    if scale.dim() == 2:
        scale = scale[..., None]  # per token; per entry (token mode) is [B, T, D] already
    sq_BTD = torch.where(mask_BTD, (pred_BTD - target_BTD.detach()) / scale, 0.0).square()
    if reduction == "entry":
        return sq_BTD.sum() / mask_BTD.sum().clamp_min(1)
    count_BT = mask_BTD.sum(-1)
    if reduction == "layer":
        B = sq_BTD.shape[0]
        layer_BT = layer_BT.long()
        num_layers = int(layer_BT.max()) + 1 if layer_BT.numel() else 1
        group_BT = torch.arange(B, device=sq_BTD.device)[:, None] * num_layers + layer_BT
        sum_G = torch.zeros(B * num_layers, dtype=sq_BTD.dtype, device=sq_BTD.device)
        sum_G.index_add_(0, group_BT.reshape(-1), sq_BTD.sum(-1).reshape(-1))
        count_G = torch.zeros_like(sum_G).index_add_(0, group_BT.reshape(-1), count_BT.reshape(-1).to(sum_G.dtype))
        return (sum_G / count_G.clamp_min(1)).sum() / (count_G > 0).sum().clamp_min(1)
    per_token_BT = sq_BTD.sum(-1) / count_BT.clamp_min(1)
    if reduction == "token":
        return per_token_BT.sum() / (count_BT > 0).sum().clamp_min(1)
    # token_power: weight n^alpha, 0 for empty tokens (0^0 would be 1)
    weight_BT = torch.where(count_BT > 0, count_BT.to(sq_BTD.dtype).pow(token_weight_alpha), 0.0)
    return (weight_BT * per_token_BT).sum() / weight_BT.sum().clamp_min(torch.finfo(weight_BT.dtype).tiny)


@torch.no_grad()
def r_squared(pred_BTD: torch.Tensor, target_BTD: torch.Tensor, mask_BTD: torch.Tensor) -> torch.Tensor:
    """1 - SS_res / SS_tot over valid entries only (the reference counted padding, which inflated it)."""
    mask_BTD = mask_BTD.bool()
    n = mask_BTD.sum().clamp_min(1)
    mean = torch.where(mask_BTD, target_BTD, 0.0).sum() / n
    ss_res = torch.where(mask_BTD, pred_BTD - target_BTD, 0.0).square().sum()
    ss_tot = torch.where(mask_BTD, target_BTD - mean, 0.0).square().sum()
    return 1.0 - ss_res / ss_tot.clamp_min(torch.finfo(ss_tot.dtype).tiny)


def nt_xent(zp_i_BF: torch.Tensor, zp_j_BF: torch.Tensor, temperature: float,
            gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """SimCLR NT-Xent over the global batch: positives are the two views of a window, negatives all others.

    ``gather(x_bF) -> x_WbF`` concatenates a tensor over the W data-parallel ranks in rank order, the calling
    rank's slice being ``x`` itself (differentiable) and the others constants (see ``distributed_gather``).
    Every rank then computes the loss of the whole global batch, so its value equals the one-process loss
    of the concatenated batch, and the gradient of its local embeddings is exact; because DDP *averages*
    gradients over ranks, the gradient (not the value) is multiplied by W so the average is the global one.
    Any batch size works (a batch of one window has only its positive: loss 0).
    """
    if temperature <= 0:
        raise ConfigError(f"loss.temperature must be > 0, got {temperature}")
    world = 1
    if gather is not None:
        local = zp_i_BF.shape[0]
        zp_i_BF, zp_j_BF = gather(zp_i_BF), gather(zp_j_BF)
        world = zp_i_BF.shape[0] // max(local, 1)
    n = zp_i_BF.shape[0]
    reps_NF = F.normalize(torch.cat([zp_i_BF, zp_j_BF]).float(), dim=-1)
    sim_NN = reps_NF @ reps_NF.T / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=sim_NN.device)
    sim_NN = sim_NN.masked_fill(eye, float("-inf"))
    labels = (torch.arange(2 * n, device=sim_NN.device) + n) % (2 * n)
    loss = F.cross_entropy(sim_NN, labels)
    if world > 1:
        loss = loss + (world - 1) * (loss - loss.detach())
    return loss


def distributed_gather(x_bF: torch.Tensor) -> torch.Tensor:
    """``gather`` for ``nt_xent`` under torch.distributed: all_gather, then put the local (graph) tensor back.

    Needs the same per-rank batch size on every rank (``drop_last``-style batching).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x_bF
    parts = [torch.empty_like(x_bF) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_bF.detach().contiguous())
    parts[dist.get_rank()] = x_bF
    return torch.cat(parts)


def sane_loss(recon_1_BTD: torch.Tensor, recon_2_BTD: torch.Tensor, zp_1_BF: torch.Tensor, zp_2_BF: torch.Tensor,
              target_1_BTD: torch.Tensor, target_2_BTD: torch.Tensor, mask_BTD: torch.Tensor, loss_cfg: LossConfig,
              layer_BT: torch.Tensor | None = None,
              gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``gamma * nt_xent + (1 - gamma) * recon`` with both views stacked along the batch, as the reference.

    Returns ``loss`` (differentiable) and the detached terms ``loss_recon``, ``loss_contrast``, ``rsq``.
    The targets are the augmented views themselves (spec 4.2). Below gamma 1e-10 the total is the
    reconstruction alone, above 1 - 1e-10 the contrast alone (the reference's rule); both are always reported.
    """
    pred = torch.cat([recon_1_BTD, recon_2_BTD])
    target = torch.cat([target_1_BTD, target_2_BTD]).detach()
    mask = torch.cat([mask_BTD, mask_BTD]).bool()
    layer = torch.cat([layer_BT, layer_BT]) if layer_BT is not None else None
    gamma = float(loss_cfg.gamma)
    recon = reconstruction_loss(pred.float(), target.float(), mask, loss_cfg.norm_mode, loss_cfg.std_eps, layer,
                                loss_cfg.min_valid_per_token, loss_cfg.reduction, loss_cfg.token_weight_alpha)
    contrast = nt_xent(zp_1_BF, zp_2_BF, loss_cfg.temperature, gather)
    if gamma < 1e-10:
        total = recon
    elif gamma > 1 - 1e-10:
        total = contrast
    else:
        total = gamma * contrast + (1.0 - gamma) * recon
    return {"loss": total, "loss_recon": recon.detach(), "loss_contrast": contrast.detach(),
            "rsq": r_squared(pred.detach().float(), target.float(), mask)}
