"""A population of feed-forward CNNs run as ONE network: models become channel groups.

Why: ``torch.vmap`` over a conv net already lowers to grouped convolutions, but in NCHW layout, and
oneDNN's grouped kernels for zoo-sized layers (1-8 channels per model) are 2-3x faster on channels-last
maps (measured on this project's CPU: CNN-s conv2 forward+backward 0.43 -> 0.15 ms per model-step).
This is the training path, where every model sees its own images. Evaluation (one image set shared by
all models, no gradients) stays on ``vmap``: there NCHW with strided max pooling was faster (16.6 vs
13.0 CNN-s models/s on 2,000 images, one thread), even with the first convolution run as one dense conv.

Supported: the ``SequentialNet`` layouts of the registry (``cnn_s``, ``cnn_l``, ``mlp``): Conv2d
(groups=1, zero padding) and MaxPool2d layers, one Flatten, then Linear layers, with elementwise
activations and Dropout anywhere. Anything else (BatchNorm, residual nets) returns ``None`` from
``grouped_forward`` and the caller keeps ``vmap``.

Layouts inside: spatial maps are ``[B, M*C, H, W]`` (channels-last in memory; channel ``m*C + c`` is
model m's channel c), flat features are ``[M, B, F]`` (batched matmuls). Shape legend: M models, B images
per model, C channels, F features, K classes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mzsane.zoo.architectures import ACTIVATIONS, SequentialNet

_ELEMENTWISE = (*{type(factory()) for factory in ACTIVATIONS.values()}, nn.Dropout)
Forward = Callable[[dict, dict, torch.Tensor], torch.Tensor]


def _supported(template: nn.Module) -> bool:
    """Spatial layers, one Flatten, then Linear layers (activations and dropout anywhere), no buffers."""
    if not isinstance(template, SequentialNet) or list(template.buffers()):
        return False
    flat = False
    for layer in template.module_list:
        if isinstance(layer, nn.Conv2d):
            if flat or layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return False
        elif isinstance(layer, nn.MaxPool2d):
            if flat:
                return False
        elif isinstance(layer, nn.Flatten):
            if flat or layer.start_dim != 1 or layer.end_dim != -1:
                return False
            flat = True
        elif isinstance(layer, nn.Linear):
            if not flat:
                return False
        elif not isinstance(layer, _ELEMENTWISE):
            return False
    return flat and isinstance(template.module_list[-1], nn.Linear)


def _spatial(x_MBCHW: torch.Tensor) -> torch.Tensor:
    """Per-model images [M, B, C, H, W] -> one channels-last map [B, M*C, H, W]."""
    m, b, c, h, w = x_MBCHW.shape
    return x_MBCHW.transpose(0, 1).reshape(b, m * c, h, w).contiguous(memory_format=torch.channels_last)


def _conv(layer: nn.Conv2d, h: torch.Tensor, weight_M: torch.Tensor, bias_M: torch.Tensor | None) -> torch.Tensor:
    weight = weight_M.reshape(-1, *weight_M.shape[2:]).contiguous(memory_format=torch.channels_last)
    bias = None if bias_M is None else bias_M.reshape(-1)
    return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, groups=weight_M.shape[0])


def _flatten(h: torch.Tensor, m: int) -> torch.Tensor:
    """Spatial [B, M*C, H, W] -> flat [M, B, C*H*W], each model's features in its own NCHW order."""
    return h.reshape(h.shape[0], m, -1).transpose(0, 1)


def _linear(h_MBF: torch.Tensor, weight_M: torch.Tensor, bias_M: torch.Tensor | None) -> torch.Tensor:
    if bias_M is None:
        return torch.bmm(h_MBF, weight_M.transpose(1, 2))
    return torch.baddbmm(bias_M.unsqueeze(1), h_MBF, weight_M.transpose(1, 2))


def _dropout(h: torch.Tensor, p: float, generators: Sequence[torch.Generator], flat: bool) -> torch.Tensor:
    """Dropout whose mask for model m comes from ``generators[m]`` alone, so a model's masks do not
    depend on which other models share its population (per-model RNG, as when trained alone)."""
    if p >= 1.0:
        return torch.zeros_like(h)
    m = len(generators)
    shape = h.shape[1:] if flat else (h.shape[0], h.shape[1] // m, *h.shape[2:])
    keep_M = torch.stack([torch.empty(shape, dtype=h.dtype).bernoulli_(1.0 - p, generator=g) for g in generators])
    keep = keep_M if flat else _spatial(keep_M)
    return h * keep.div_(1.0 - p)


def grouped_forward(template: nn.Module, generators: Sequence[torch.Generator] | None = None) -> Forward | None:
    """``fn(params, buffers, x_MBCHW) -> logits [M, B, K]`` like ``stacked.vmapped`` with per-model
    inputs, or None if the template is not a supported feed-forward net. ``template.training`` decides
    dropout, as for the module itself; with ``generators`` (one per model) each model draws its own
    masks, otherwise they come from the global RNG.
    """
    if not _supported(template):
        return None
    layers = list(template.module_list.named_children())

    def call(params: dict[str, torch.Tensor], _buffers: dict, x_MBCHW: torch.Tensor) -> torch.Tensor:
        m = x_MBCHW.shape[0]
        if generators is not None and len(generators) != m:
            raise ValueError(f"grouped_forward got {len(generators)} generators for {m} models")
        h, flat = _spatial(x_MBCHW), False
        for name, layer in layers:
            weight = params.get(f"module_list.{name}.weight")
            bias = params.get(f"module_list.{name}.bias")
            if isinstance(layer, nn.Conv2d):
                h = _conv(layer, h, weight, bias)
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
            elif isinstance(layer, nn.Flatten):
                h, flat = _flatten(h, m), True
            elif isinstance(layer, nn.Linear):
                h = _linear(h, weight, bias)
            elif isinstance(layer, nn.Dropout) and layer.training and layer.p > 0 and generators is not None:
                h = _dropout(h, layer.p, generators, flat)
            else:  # activation or dropout: elementwise, so the layout does not matter
                h = layer(h)
        return h

    return call
