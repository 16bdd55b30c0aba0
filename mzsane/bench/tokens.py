"""``mzsane bench tokens``: tokenization and permutation-draw throughput as a JSON-able dict.

Why these figures: the issue's ingest target (a ResNet-18 checkpoint to shards in <= 7 s, <= 74 MB) is
bounded below by load + tokenize; training throughput depends on drawing permutation index maps per
sample, for whole models and for windows.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import torch

from mzsane.tokens.permutations import Permuter
from mzsane.tokens.tokenize import detokenize, layout_from_state_dict, tokenize
from mzsane.zoo.architectures import build_model


def _rate(fn: Callable[[], object], min_s: float, max_reps: int) -> tuple[float, float]:
    """(calls per second, best single-call seconds) over at least ``min_s`` seconds or ``max_reps`` calls."""
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_s or len(times) < 2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return len(times) / sum(times), min(times)


def _tokensize(args) -> int:
    cfg = getattr(args, "cfg", None)
    return int(cfg.tokens.tokensize) if cfg is not None and hasattr(cfg, "tokens") else 288


def run(args) -> dict:
    """Figures for cnn_s and resnet18 at the configured tokensize (288 by default); ``--quick`` shortens."""
    quick = bool(getattr(args, "quick", False))
    min_s, reps = (0.3, 5) if quick else (2.0, 200)
    tokensize = _tokensize(args)
    torch.manual_seed(0)
    out: dict = {"tokensize": tokensize, "torch_threads": torch.get_num_threads()}
    for arch in ("cnn_s", "resnet18"):
        sd = build_model(arch).state_dict()
        layout = layout_from_state_dict(sd, tokensize)
        tokens_ND = tokenize(sd, layout)
        permuter = Permuter(arch, layout)
        g = torch.Generator().manual_seed(0)
        window = torch.arange(min(256, layout.num_tokens))
        index_1K = permuter.sample_index(g, 1)
        rec = {
            "num_tokens": layout.num_tokens,
            "num_layers": layout.num_layers,
            "token_bytes_per_checkpoint": layout.num_tokens * tokensize * 4,
            "checkpoints_tokenized_per_s": _rate(partial(tokenize, sd, layout), min_s, reps)[0],
            "checkpoints_detokenized_per_s": _rate(partial(detokenize, tokens_ND, layout, sd), min_s, reps)[0],
            "full_index_draws_per_s": _rate(partial(permuter.sample_index, g, 1), min_s, reps)[0],
            "window256_index_draws_per_s": _rate(partial(permuter.sample_index, g, 1, window), min_s, reps)[0],
            "full_apply_per_s": _rate(partial(Permuter.apply, tokens_ND, index_1K), min_s, reps)[0],
        }
        if arch == "resnet18":
            rec.update(_ingest_one(sd, tokensize))
        out[arch] = rec
    return out


def _ingest_one(sd: dict, tokensize: int) -> dict:
    """One ResNet-18 checkpoint from a safetensors file on local disk to tokens (fresh layout, cold)."""
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        t0 = time.perf_counter()
        loaded = load_file(path)
        t1 = time.perf_counter()
        layout = layout_from_state_dict(loaded, tokensize)
        tokenize(loaded, layout)
        t2 = time.perf_counter()
    return {"load_safetensors_s": t1 - t0, "tokenize_one_checkpoint_s": t2 - t1,
            "load_and_tokenize_s": t2 - t0}
