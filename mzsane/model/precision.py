"""Which floating-point type a backbone computes in: training's autocast dtype and sampling's backbone dtype.

Why one home: both follow the same fact about the hardware. A GPU with bf16 runs bf16; a CPU with native bf16
dot products (AVX512-BF16 or AMX, which oneDNN uses) ran the demo step's matmuls ~3.7x faster in bf16 than in fp32
(a profile of one step) and square matmuls 4.5x faster (``bench train``'s measured peaks); one without them
emulates bf16 more slowly than it computes fp32.
Attention stays fp32 under CPU autocast (``model/sane.py``: the CPU's bf16 flash-attention backward is the slow
part), so a CPU bf16 step is the projections and MLPs in bf16 with fp32 master weights, as on a GPU.
"""
from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (oneDNN's check for AVX512-BF16 / AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype for ``train.precision`` (None: plain fp32).

    GPU: bf16 where supported, else fp16 (the loop adds a GradScaler). CPU: ``bf16`` always (slow without native
    bf16: the user asked for it), ``auto`` bf16 only with native bf16; fp16 has no CPU kernels worth using, so
    ``fp16`` trains fp32 there."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if device.type == "cpu" and (precision == "bf16" or (precision == "auto" and cpu_has_native_bf16())):
        return torch.bfloat16
    return None


def compute_dtype(precision: str, device: str) -> torch.dtype:
    """Sampling's backbone dtype for encode/decode (``sample.precision``). ``auto``: bfloat16 on GPUs with bf16 and
    on CPUs with native bf16, else float32. Decoded weights differ by ~0.5% relative, far below the sampling
    noise."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
