"""Haloing: encode or decode a whole model's token sequence in overlapping windows (spec section 2.3).

Why: a trained SANE backbone saw windows of a few hundred tokens, but a target model has thousands
(ResNet-18: ~44k). The sequence is cut into content windows of ``window`` tokens; each chunk carries
``halo`` tokens of context on both sides so the transformer sees neighbours at the window borders, and
only the content part of every chunk is kept. Every position is produced by exactly one chunk.

Chunk rules (the reference's, generalised so every N works, including N < window):
  * chunk i holds content positions ``[i*window, min((i+1)*window, N))``;
  * its span is ``C = min(window + 2*halo, N)`` tokens starting at ``content_start - halo``, shifted
    right to start at 0 (first chunk) and left to end at N (last chunk): this gives the reference's
    first chunk ``[0, C)``, middle chunks ``[i*w - h, (i+1)*w + h)`` and last chunk "the final C tokens";
  * all chunks have the same length C, so the chunks of many models stack into one batch;
  * positions passed with each chunk are the true global positions of its tokens.

Streaming: ``halo_apply`` gathers one batch of chunks at a time (across all models), runs the function
and scatters the content parts straight into the output, so peak memory is the output plus one batch.

Legend: M models, N tokens in a whole model, C chunk length, K chunks per model, B chunks in a batch,
T tokens in a chunk (= C), X/Y feature widths (token width D or latent width L), P position axes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mzsane.errors import ConfigError

ChunkFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HaloPlan:
    """Where every chunk of one model starts and which of its tokens are content."""

    num_tokens: int
    window: int
    halo: int
    index_KT: torch.Tensor  # long [K, C]: global token index of each chunk position
    content_KT: torch.Tensor  # bool [K, C]: True where that chunk position is content (exactly once per token)

    @property
    def num_chunks(self) -> int:
        return int(self.index_KT.shape[0])

    @property
    def chunk_len(self) -> int:
        return int(self.index_KT.shape[1])


def plan(num_tokens: int, window: int, halo: int) -> HaloPlan:
    """Chunk plan for a sequence of ``num_tokens`` with content ``window`` and context ``halo`` per side."""
    if window <= 0 or halo < 0:
        raise ConfigError(f"sample.halo_window={window} and sample.halo_size={halo} are invalid; "
                          "use halo_window > 0 and halo_size >= 0")
    if num_tokens <= 0:
        raise ConfigError(f"a model with {num_tokens} tokens cannot be haloed; check the target architecture")
    n, w, h = num_tokens, window, halo
    chunk_len = min(w + 2 * h, n)
    num_chunks = -(-n // w)
    content_start_K = torch.arange(num_chunks) * w
    content_stop_K = torch.clamp(content_start_K + w, max=n)
    start_K = torch.clamp(content_start_K - h, min=0)
    start_K = torch.minimum(start_K, torch.full_like(start_K, n - chunk_len))
    index_KT = start_K[:, None] + torch.arange(chunk_len)[None, :]
    content_KT = (index_KT >= content_start_K[:, None]) & (index_KT < content_stop_K[:, None])
    return HaloPlan(n, w, h, index_KT, content_KT)


def haloify(x_MNX: torch.Tensor, halo_plan: HaloPlan) -> torch.Tensor:
    """All chunks of all models, stacked: ``[M*K, C, X]`` (model-major)."""
    m = x_MNX.shape[0]
    chunks = x_MNX[:, halo_plan.index_KT]  # [M, K, C, X]
    return chunks.reshape(m * halo_plan.num_chunks, halo_plan.chunk_len, *x_MNX.shape[2:])


def dehaloify(y_BTY: torch.Tensor, halo_plan: HaloPlan, num_models: int) -> torch.Tensor:
    """Inverse of ``haloify``: keep each chunk's content part, giving ``[M, N, Y]``."""
    out = y_BTY.new_zeros((num_models, halo_plan.num_tokens, *y_BTY.shape[2:]))
    _scatter_content(out, y_BTY, torch.arange(y_BTY.shape[0]), halo_plan)
    return out


def _scatter_content(out_MNY: torch.Tensor, y_BTY: torch.Tensor, chunk_ids_B: torch.Tensor,
                     halo_plan: HaloPlan) -> None:
    """Copy the content rows of a batch of chunks into ``out_MNY`` with one flat gather + index_copy."""
    k, n = halo_plan.num_chunks, halo_plan.num_tokens
    model_B, chunk_B = chunk_ids_B // k, chunk_ids_B % k
    src_R = halo_plan.content_KT[chunk_B].reshape(-1).nonzero().squeeze(1)  # rows of y as [B*T]
    dest_BT = model_B[:, None] * n + halo_plan.index_KT[chunk_B]
    dest_R = dest_BT.reshape(-1)[src_R]
    rows = y_BTY.reshape(-1, *y_BTY.shape[2:]).index_select(0, src_R)
    out_MNY.view(-1, *out_MNY.shape[2:]).index_copy_(0, dest_R, rows.to(out_MNY.dtype))


def halo_apply(fn: ChunkFn, x_MNX: torch.Tensor, positions_NP: torch.Tensor, halo_plan: HaloPlan,
               batch_size: int, out_dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run ``fn(x_BTX, positions_BTP, valid_BT) -> y_BTY`` over every chunk of every model.

    Chunks from all M models are processed ``batch_size`` at a time (a batch may mix models), and
    only the content part of each chunk is written to the ``[M, N, Y]`` result on the CPU (Y is
    whatever ``fn`` returns). ``compute_dtype`` casts each gathered batch (e.g. bfloat16 for a bf16 backbone).
    """
    if x_MNX.shape[1] != halo_plan.num_tokens or positions_NP.shape[0] != halo_plan.num_tokens:
        raise ValueError("halo plan, tokens and positions disagree on the number of tokens")
    m = x_MNX.shape[0]
    total = m * halo_plan.num_chunks
    out_MNY: torch.Tensor | None = None
    positions_KTP = positions_NP[halo_plan.index_KT].to(device)
    index_KT = halo_plan.index_KT
    for lo in range(0, total, max(1, batch_size)):
        chunk_ids_B = torch.arange(lo, min(lo + batch_size, total))
        model_B, chunk_B = chunk_ids_B // halo_plan.num_chunks, chunk_ids_B % halo_plan.num_chunks
        x_BTX = x_MNX[model_B[:, None], index_KT[chunk_B]].to(device=device, dtype=compute_dtype or x_MNX.dtype)
        positions_BTP = positions_KTP[chunk_B.to(device)]
        valid_BT = torch.ones(x_BTX.shape[:2], dtype=torch.bool, device=device)
        y_BTY = fn(x_BTX, positions_BTP, valid_BT).cpu()
        if out_MNY is None:
            out_MNY = torch.zeros((m, halo_plan.num_tokens, *y_BTY.shape[2:]), dtype=out_dtype)
        _scatter_content(out_MNY, y_BTY, chunk_ids_B, halo_plan)
    assert out_MNY is not None, "halo_apply needs at least one model"
    return out_MNY


def encode(backbone: torch.nn.Module, tokens_MND: torch.Tensor, positions_NP: torch.Tensor,
           halo_plan: HaloPlan, batch_size: int, device: torch.device | str = "cpu",
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Whole-model embeddings ``z_MNL`` from ``backbone.encode`` over haloed chunks."""
    with torch.no_grad():
        return halo_apply(backbone.encode, tokens_MND, positions_NP, halo_plan, batch_size, device=device,
                          compute_dtype=compute_dtype)


def decode(backbone: torch.nn.Module, z_MNL: torch.Tensor, positions_NP: torch.Tensor,
           halo_plan: HaloPlan, batch_size: int, device: torch.device | str = "cpu",
           compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Whole-model tokens ``tokens_MND`` from ``backbone.decode`` over haloed chunks."""
    with torch.no_grad():
        return halo_apply(backbone.decode, z_MNL, positions_NP, halo_plan, batch_size, device=device,
                          compute_dtype=compute_dtype)
