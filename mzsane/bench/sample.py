"""``mzsane bench sample``: generation throughput and memory, as a JSON-able dict.

Figures:
  * ``resnet18.decode_s_per_candidate``: halo-decoding one whole ResNet-18 (43,924 tokens at tokensize 288,
    halo 128/12) with the ``small`` preset's backbone (d_model 512, 1 encoder + 1 decoder layer, latent 32),
    against the reference's 3.3-3.9 s per candidate on 2 cores; reported for fp32 and bf16, plus the
    reference's own decode settings (8 chunks per call, fp32) timed here on the same backbone.
  * ``resnet18.stream``: the full streamed pipeline (latents -> decode -> detokenize -> BN re-estimation ->
    validation score, running top-n) over ``num_candidates`` ResNet-18 candidates, with peak RSS. BN and
    scoring use small synthetic image sets here (the figure is about the generator and memory; ResNet-18
    forward passes on 2 CPU cores dominate otherwise).
  * ``cnn_s``: the same pipeline at the demo's scale, in candidates generated + conditioned + scored per s.
A randomly initialized backbone is as fast as a trained one, so no training run is needed.
"""
from __future__ import annotations

import copy
import time

import torch

from mzsane.config import ModelConfig, SampleConfig
from mzsane.model import halo
from mzsane.model.sane import SANE
from mzsane.presets import small
from mzsane.sample.anchors import Anchors
from mzsane.sample.generate import generate, peak_rss_bytes
from mzsane.tokens.tokenize import tokens_of
from mzsane.zoo.architectures import build_model
from mzsane.zoo.datasets import Split


class _Images:
    """Synthetic train/val splits (no test attribute at all: generation must not need one)."""

    def __init__(self, channels: int, size: int, num: int):
        g = torch.Generator().manual_seed(0)
        self.train = Split(torch.randn(num, channels, size, size, generator=g),
                           torch.randint(0, 10, (num,), generator=g))
        self.val = Split(torch.randn(num, channels, size, size, generator=g), torch.randint(0, 10, (num,), generator=g))


def _setup(arch: str, num_anchors: int, tokensize: int) -> tuple[SANE, Anchors]:
    sds = []
    for i in range(num_anchors):
        torch.manual_seed(i)
        sds.append(build_model(arch).state_dict())
    tokens, layout = zip(*(tokens_of(sd, tokensize) for sd in sds))
    model = SANE(small().model, tokensize, [m + 1 for m in layout[0].max_positions]).eval()
    anchors = Anchors(zoo=f"bench-{arch}", dataset="synthetic", architecture=arch, arch_kwargs={}, hparams={},
                      epoch=0, model_ids=[f"a{i}" for i in range(num_anchors)], state_dicts=sds,
                      tokens_KND=torch.stack(tokens), layout=layout[0])
    return model, anchors


def _decode_seconds(model: SANE, anchors: Anchors, dtype: torch.dtype, reps: int, batch_size: int) -> float:
    layout = anchors.layout
    plan = halo.plan(layout.num_tokens, 128, 12)
    m = copy.deepcopy(model).to(dtype)
    z = torch.randn(reps, layout.num_tokens, model.cfg.latent_dim)
    halo.decode(m, z[:1], layout.positions_NP, plan, batch_size, compute_dtype=dtype)  # warm-up
    t = time.perf_counter()
    halo.decode(m, z, layout.positions_NP, plan, batch_size, compute_dtype=dtype)
    return (time.perf_counter() - t) / reps


def _stream(model: SANE, anchors: Anchors, cfg: SampleConfig, images: _Images) -> dict:
    rss0 = peak_rss_bytes()
    t = time.perf_counter()
    gen = generate(model, anchors, images, cfg)
    wall = time.perf_counter() - t
    return {"num_candidates": cfg.num_candidates, "candidate_batch_size": cfg.candidate_batch_size,
            "bn_iterations": cfg.bn_iterations, "val_images": len(images.val), "wall_s": wall,
            "candidates_per_s": cfg.num_candidates / wall, "timings": gen.timings,
            "peak_rss_bytes": peak_rss_bytes(), "peak_rss_before_bytes": rss0}


def run(args) -> dict:
    """ResNet-18 decode speed and streamed memory with the small backbone, plus cnn_s throughput."""
    quick = bool(getattr(args, "quick", False))
    out: dict = {"torch_threads": torch.get_num_threads(), "reference_decode_s_per_candidate": [3.3, 3.9]}
    model, anchors = _setup("resnet18", 2, 288)
    rec: dict = {"num_tokens": anchors.layout.num_tokens, "halo": [128, 12]}
    reps = 2 if quick else 5
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rec[f"decode_s_per_candidate_{name}"] = _decode_seconds(model, anchors, dtype, reps, 64)
    # the reference's decode settings (8 chunks per call, fp32), timed side by side on the same machine state
    rec["decode_s_per_candidate_reference_style"] = _decode_seconds(model, anchors, torch.float32, 1, 8)
    best = min(rec["decode_s_per_candidate_fp32"], rec["decode_s_per_candidate_bf16"])
    rec["speedup_vs_reference"] = [3.3 / best, 3.9 / best]
    rec["speedup_vs_reference_style_here"] = rec["decode_s_per_candidate_reference_style"] / best
    # decoding is compute-bound, so the ratio to the reference's figure depends on the backbone's size: the
    # same timings for the reference's small SANE (d_model 128, 2 + 2 layers, latent 32)
    ref_model = SANE(ModelConfig(d_model=128, num_heads=4, num_layers=2, latent_dim=32), 288,
                     [m + 1 for m in anchors.layout.max_positions]).eval()
    ref_rec = {name: _decode_seconds(ref_model, anchors, dtype, reps, 64)
               for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    ref_rec["reference_style"] = _decode_seconds(ref_model, anchors, torch.float32, 1, 8)
    ref_best = min(ref_rec["fp32"], ref_rec["bf16"])
    ref_rec["speedup_vs_reference"] = [3.3 / ref_best, 3.9 / ref_best]
    rec["decode_s_per_candidate_d128_backbone"] = ref_rec
    cfg = SampleConfig(num_anchors=2, num_candidates=8 if quick else 200, num_keep=10 if not quick else 4,
                       candidate_batch_size=4 if quick else 25, bn_iterations=1, bn_batch_size=16,
                       halo_window=128, halo_size=12, encode_batch_size=64)
    rec["stream"] = _stream(model, anchors, cfg, _Images(3, 32, 32))
    out["resnet18"] = rec
    model, anchors = _setup("cnn_s", 5, 288)
    cfg = SampleConfig(num_candidates=50 if quick else 200, num_keep=10, candidate_batch_size=50, bn_iterations=0,
                       halo_window=128, halo_size=12)
    out["cnn_s"] = {"num_tokens": anchors.layout.num_tokens,
                    "stream": _stream(model, anchors, cfg, _Images(1, 28, 5000))}
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
