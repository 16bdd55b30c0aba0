"""The SANE autoencoder (spec section 3): weight tokens -> per-token latents -> weight tokens.

Why this shape: the reference (nanoGPT-style pre-LN blocks, learned 3-part positional embeddings,
per-token compression to a small latent width) is kept so results compare, with two fixes that let one
model serve mixed architectures and arbitrary window lengths:

* attention takes a key padding mask, so tokens that only pad a short model up to the window (``valid``
  False) never influence the valid ones;
* the projection head pools the latents with a masked mean instead of flattening a fixed 256-token
  window, so it works for any window length and for padded windows (see ``ProjectionHead``).

Shape legend: B batch, T tokens in window, D token width, H model width (d_model), L latent width,
P position axes (3: token index, layer index, row within layer), F projection width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mzsane.config import ModelConfig
from mzsane.errors import ConfigError, DataError


class PositionEmbedding(nn.Module):
    """Learned tables E1[token], E2[layer], E3[row]; the embedding is ``concat(E1[n] + E2[l], E3[c])``.

    The first half of the width carries token + layer, the second half the row, exactly as the reference
    ``PositionEmbs``; the tables are sized from the shard manifest's ``max_positions`` (+1 already added).
    """

    def __init__(self, max_positions: list[int], d_model: int):
        super().__init__()
        if len(max_positions) != 3 or min(max_positions) < 1:
            raise ConfigError(f"model max_positions {list(max_positions)} must be three positive table sizes "
                              "[tokens, layers, rows]; take them from the shard manifest's max_positions")
        half = d_model // 2
        self.max_positions = [int(m) for m in max_positions]
        self.token = nn.Embedding(self.max_positions[0], half)
        self.layer = nn.Embedding(self.max_positions[1], half)
        self.row = nn.Embedding(self.max_positions[2], d_model - half)

    def check(self, positions_BTP: torch.Tensor) -> None:
        """Fail with one line instead of an index error deep inside ``embedding``."""
        if positions_BTP.shape[-1] != 3:
            raise DataError(f"positions have {positions_BTP.shape[-1]} axes; SANE needs 3 (token, layer, row)")
        if positions_BTP.numel() == 0:
            return
        high = positions_BTP.reshape(-1, 3).amax(0).tolist()
        low = int(positions_BTP.min())
        names = ("token", "layer", "row")
        for axis, (value, size) in enumerate(zip(high, self.max_positions)):
            if value >= size:
                raise DataError(f"{names[axis]} position {value} exceeds the model's embedding table of size "
                                f"{size} (model.max_positions={self.max_positions}); train a model whose "
                                "max_positions cover this data (shards manifest max_positions)")
        if low < 0:
            raise DataError(f"negative position {low} in the input; positions must be >= 0")

    def forward(self, positions_BTP: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.check(positions_BTP)
        p = positions_BTP.long()
        return torch.cat([self.token(p[..., 0]) + self.layer(p[..., 1]), self.row(p[..., 2])], dim=-1)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (LayerNorm without bias)."""

    def __init__(self, d_model: int, num_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_proj = nn.Linear(d_model, d_model, bias=False)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.mlp_fc = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.mlp_proj = nn.Linear(mlp_ratio * d_model, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTH: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x_BTH.shape
        # one fused projection; q, k, v are strided views of it (no copies)
        q, k, v = self.qkv(self.ln_1(x_BTH)).view(B, T, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # the CPU's bf16 flash-attention backward is ~7x slower than its fp32 one, while bf16 matmuls are
            # ~3.7x faster (model/precision.py): under CPU autocast only the projections and MLPs run in bf16
            # (and a bf16 backbone, as sampling loads it, gets its attention output back in bf16)
            q32, k32, v32 = (t.float().contiguous() for t in (q, k, v))
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=attn_mask, dropout_p=dropout).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        x_BTH = x_BTH + self.drop(self.attn_proj(y.transpose(1, 2).reshape(B, T, H)))
        return x_BTH + self.drop(self.mlp_proj(F.gelu(self.mlp_fc(self.ln_2(x_BTH)))))


class ProjectionHead(nn.Module):
    """Window latents -> one vector per window for NT-Xent, for any window length and padding.

    Why not the reference's flatten + Linear(256*L -> F): that binds the head to one window length and
    lets padded tokens leak in. Here a per-token layer (L -> L, GELU) is followed by a mean over the valid
    tokens only (a DeepSets-style pooling, permutation-invariant over the window's tokens), then
    LayerNorm -> Linear(L -> F) -> LayerNorm -> ReLU -> Linear(F -> F). The last layer is linear (SimCLR's
    head) so the cosine similarity is not confined to the positive orthant.
    """

    def __init__(self, latent_dim: int, projection_dim: int):
        super().__init__()
        self.token_fc = nn.Linear(latent_dim, latent_dim)
        self.ln_1 = nn.LayerNorm(latent_dim)
        self.fc_1 = nn.Linear(latent_dim, projection_dim, bias=False)
        self.ln_2 = nn.LayerNorm(projection_dim)
        self.fc_2 = nn.Linear(projection_dim, projection_dim, bias=False)

    def forward(self, z_BTL: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
        h_BTL = F.gelu(self.token_fc(z_BTL))
        w_BT = valid_BT.to(h_BTL.dtype)
        pooled_BL = torch.einsum("btl,bt->bl", h_BTL, w_BT) / w_BT.sum(1, keepdim=True).clamp_min(1.0)
        return self.fc_2(F.relu(self.ln_2(self.fc_1(self.ln_1(pooled_BL)))))


class SANE(nn.Module):
    """Encoder (tokens -> z) and decoder (z -> tokens) sharing one positional embedding, plus the head.

    ``generator`` seeds the initialisation (spec 3.2: N(0, 0.02) for linear and embedding weights, zero
    biases, residual output projections N(0, 0.02 / sqrt(2 * num_layers))); None means seed 0, so two
    models built from the same config are identical unless a generator says otherwise.
    """

    def __init__(self, model_cfg: ModelConfig, tokensize: int, max_positions: list[int],
                 generator: torch.Generator | None = None):
        super().__init__()
        c = model_cfg
        if c.d_model % c.num_heads or c.d_model % 2:
            raise ConfigError(f"model.d_model={c.d_model} must be even and divisible by model.num_heads={c.num_heads}")
        if tokensize < 1 or c.latent_dim < 1 or c.num_layers < 0:
            raise ConfigError(f"model sizes must be positive (tokensize={tokensize}, latent_dim={c.latent_dim})")
        self.cfg = c
        self.tokensize = int(tokensize)
        self.max_positions = [int(m) for m in max_positions]
        H = c.d_model
        self.tokenizer = nn.Linear(tokensize, H)
        self.position = PositionEmbedding(self.max_positions, H)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(Block(H, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.num_layers))
        self.encoder_comp = nn.Linear(H, c.latent_dim)
        self.decoder_comp = nn.Linear(c.latent_dim, H)
        self.decoder = nn.ModuleList(Block(H, c.num_heads, c.mlp_ratio, c.dropout) for _ in range(c.num_layers))
        self.detokenizer = nn.Linear(H, tokensize)
        self.head = ProjectionHead(c.latent_dim, c.projection_dim)
        self._init_weights(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator) -> None:
        residual_std = 0.02 / math.sqrt(2 * max(self.cfg.num_layers, 1))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attn_proj", "mlp_proj")) else 0.02
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def _attn_mask(valid_BT: torch.Tensor | None) -> torch.Tensor | None:
        """Key padding mask [B, 1, 1, T] (True = attend), or None when nothing is padded (faster kernels).

        A window with no valid token at all attends to everything, so SDPA never sees an all-False row
        (which would give NaN); its outputs are masked out of every loss anyway.
        """
        if valid_BT is None:
            return None
        valid_BT = valid_BT.bool()
        if not torch.compiler.is_compiling() and bool(valid_BT.all()):
            return None
        keys_BT = valid_BT | ~valid_BT.any(dim=1, keepdim=True)
        return keys_BT[:, None, None, :]

    def _stack(self, x_BTH: torch.Tensor, blocks: nn.ModuleList, valid_BT: torch.Tensor | None) -> torch.Tensor:
        mask = self._attn_mask(valid_BT)
        for block in blocks:
            x_BTH = block(x_BTH, mask)
        return x_BTH

    def _check_tokens(self, tokens_BTD: torch.Tensor) -> None:
        if tokens_BTD.dim() != 3 or tokens_BTD.shape[-1] != self.tokensize:
            raise DataError(f"tokens of shape {tuple(tokens_BTD.shape)} do not match the model's tokensize "
                            f"{self.tokensize}; use shards tokenized with tokens.tokensize={self.tokensize}")

    def encode(self, tokens_BTD: torch.Tensor, positions_BTP: torch.Tensor,
               valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        self._check_tokens(tokens_BTD)
        x_BTH = self.drop(self.tokenizer(tokens_BTD) + self.position(positions_BTP))
        return self.encoder_comp(self._stack(x_BTH, self.encoder, valid_BT))

    def decode(self, z_BTL: torch.Tensor, positions_BTP: torch.Tensor,
               valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        x_BTH = self.drop(self.decoder_comp(z_BTL) + self.position(positions_BTP))
        return self.detokenizer(self._stack(x_BTH, self.decoder, valid_BT))

    def project(self, z_BTL: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        if valid_BT is None:
            valid_BT = torch.ones(z_BTL.shape[:2], dtype=torch.bool, device=z_BTL.device)
        return self.head(z_BTL, valid_BT)

    def forward(self, tokens_BTD: torch.Tensor, positions_BTP: torch.Tensor,
                valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_BTL = self.encode(tokens_BTD, positions_BTP, valid_BT)
        return z_BTL, self.project(z_BTL, valid_BT), self.decode(z_BTL, positions_BTP, valid_BT)

    def matmul_params(self) -> int:
        """Weights used in per-token matmuls (blocks, in/out and (de)compression); for FLOP accounting."""
        mods = [self.tokenizer, self.encoder_comp, self.decoder_comp, self.detokenizer]
        total = sum(m.weight.numel() for m in mods)
        for block in list(self.encoder) + list(self.decoder):
            total += sum(m.weight.numel() for m in (block.qkv, block.attn_proj, block.mlp_fc, block.mlp_proj))
        return total

    def train_flops_per_token(self, window: int) -> float:
        """Analytic forward+backward FLOPs per token: 6 x matmul params + 12 x layers x T x H (attention)."""
        return 6.0 * self.matmul_params() + 12.0 * 2 * self.cfg.num_layers * window * self.cfg.d_model
