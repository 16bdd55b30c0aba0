"""Many models of one structure run as one: state_dicts stacked per key and called through ``torch.vmap``.

Why: a zoo is hundreds of tiny networks (CNN-s has 2,464 parameters); a Python loop per model spends
its time in interpreter and kernel-launch overhead. Here the M models' parameters are stacked into one
tensor per state_dict key and the forward pass is ``torch.vmap`` over ``torch.func.functional_call``
(which turns convolutions into grouped convolutions), so one call runs every model. Population training
(``population.py``) and the evaluation primitives (``evaluation.py``) are both built on this; training
feed-forward CNNs swaps vmap for the channels-last grouped network of ``grouped.py`` (``training_call``).

MaxPool 2x2 is replaced by strided maxima with ``max_pool2d``'s own backward (10x faster forward on
NCHW maps, identical values and gradients). Models are run in chunks whose activations fit a small
byte budget (``models_per_call``), because this CPU is memory-bandwidth bound.

Shape legend: M models, B images per batch, K classes, N images in a split.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mzsane.errors import DataError
from mzsane.zoo.architectures import build_model
from mzsane.zoo.grouped import grouped_forward

STRUCTURAL_KEYS = ("architecture", "channels_in", "num_classes", "image_size", "activation", "dropout")
# Activation bytes per vmapped call. Small on purpose: this CPU is memory-bandwidth bound, and a call
# whose maps stay in cache ran ~6x faster than one 192 MiB call (measured); training keeps more alive.
ACTIVATION_BUDGET_BYTES = 8 * 2**20
TRAIN_BUDGET_BYTES = 16 * 2**20
MAX_EVAL_BATCH = 256

# ------------------------------------------------------------------------------- model bookkeeping


def model_kwargs(spec: dict) -> tuple[str, dict]:
    """Split ``{"architecture": name, **build_model kwargs}`` into (name, kwargs)."""
    if "architecture" not in spec:
        raise DataError(f"arch_kwargs {sorted(spec)} lack 'architecture'; pass {{'architecture': 'cnn_s', ...}}")
    kwargs = {k: v for k, v in spec.items() if k != "architecture"}
    return spec["architecture"], kwargs


def _structure_key(spec: dict) -> str:
    return json.dumps({k: spec.get(k) for k in STRUCTURAL_KEYS}, sort_keys=True, default=str)


class _MaxPool2x2(torch.autograd.Function):
    """2x2/stride-2 max pooling from strided elementwise maxima: ~10x faster than ``max_pool2d`` on CPU
    for many-channel NCHW maps (measured). It also returns ``max_pool2d``'s flat argmax indices (first
    maximal element of each window), and the backward is ``max_pool2d``'s own, so gradients are exact."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2], x.shape[-1]
        xc = x[..., : h // 2 * 2, : w // 2 * 2]
        a, b, c, d = xc[..., 0::2, 0::2], xc[..., 0::2, 1::2], xc[..., 1::2, 0::2], xc[..., 1::2, 1::2]
        out = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        rows = torch.arange(0, h // 2 * 2, 2, device=x.device).view(-1, 1) * w
        base = rows + torch.arange(0, w // 2 * 2, 2, device=x.device).view(1, -1)
        offset = torch.where(a == out, 0, torch.where(b == out, 1, torch.where(c == out, w, w + 1)))
        return out, base + offset

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad, _grad_index):
        x, index = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, index)


class _StridedMaxPool2d(nn.MaxPool2d):
    """A 2x2/stride-2 ``nn.MaxPool2d`` (so layout-aware callers such as ``grouped.py`` still see one)."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: the values only, no argmax bookkeeping
            x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
            return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                                 torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))
        return _MaxPool2x2.apply(x)[0]


def _fast_pools(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if (isinstance(child, nn.MaxPool2d) and child.kernel_size in (2, (2, 2)) and child.stride in (2, (2, 2))
                and child.padding in (0, (0, 0)) and child.dilation in (1, (1, 1)) and not child.ceil_mode):
            setattr(module, name, _StridedMaxPool2d())
        else:
            _fast_pools(child)
    return module


@functools.lru_cache(maxsize=64)
def _template(structure: str, extra: str) -> nn.Module:
    """A meta-device module whose code functional_call runs with stacked tensors."""
    spec = {**json.loads(structure), **json.loads(extra)}
    spec = {k: v for k, v in spec.items() if v is not None}
    name, kwargs = model_kwargs(spec)
    with torch.random.fork_rng(devices=[]):  # a cached build must not move the seeded RNG (dropout masks)
        return _fast_pools(build_model(name, **kwargs).to("meta"))


def template_for(spec: dict) -> nn.Module:
    extra = {k: v for k, v in spec.items() if k not in STRUCTURAL_KEYS and k != "init"}
    return _template(_structure_key(spec), json.dumps(extra, sort_keys=True, default=str))


@functools.lru_cache(maxsize=64)
def _activation_bytes(structure: str) -> int:
    """Bytes of activations one image produces in a forward pass (measured once with hooks)."""
    spec = {k: v for k, v in json.loads(structure).items() if v is not None}
    name, kwargs = model_kwargs(spec)
    total = [0]
    # first use happens inside a seeded training run: building and running (dropout) must not move its RNG
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_model(name, **kwargs)
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
        model(torch.zeros(1, spec.get("channels_in", 1), spec.get("image_size", 28), spec.get("image_size", 28)))
    return 4 * max(total[0], 1)


def models_per_call(spec: dict, batch_size: int, budget: int = 0) -> int:
    """How many models to run at once so activations stay within ``budget`` (default: eval budget)."""
    per_model = _activation_bytes(_structure_key(spec)) * batch_size
    return max(1, (budget or ACTIVATION_BUDGET_BYTES) // max(per_model, 1))


def stack_state_dicts(state_dicts: Sequence[dict]) -> dict[str, torch.Tensor]:
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts):
        if list(sd) != keys:
            raise DataError(f"state_dict {i} has keys {sorted(sd)[:4]}... unlike the first; "
                            "group models by architecture")
    return {k: torch.stack([sd[k].detach().to(torch.float32 if sd[k].is_floating_point() else sd[k].dtype)
                            for sd in state_dicts]) for k in keys}


def unstack_state_dict(stacked: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    return {k: v[index].detach().clone() for k, v in stacked.items()}


def split_params(template: nn.Module, stacked: dict[str, torch.Tensor]):
    param_names = [n for n, _ in template.named_parameters()]
    params = {n: stacked[n] for n in param_names}
    buffers = {n: v for n, v in stacked.items() if n not in params}
    return params, buffers


def vmapped(template: nn.Module, shared_input: bool) -> Callable:
    def call(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    return torch.vmap(call, in_dims=(0, 0, None if shared_input else 0), randomness="different")


def training_call(template: nn.Module, generators: Sequence[torch.Generator] | None = None) -> Callable:
    """``fn(params, buffers, x_MB...) -> [M, B, K]`` for per-model inputs: the grouped channels-last network
    where the template is a plain feed-forward CNN (``grouped.py``, faster to train; dropout masks from
    ``generators``, one per model), ``vmapped`` otherwise (BatchNorm, residual nets; masks from the global
    RNG)."""
    return grouped_forward(template, generators) or vmapped(template, shared_input=False)


def group_by_structure(specs: Sequence[dict]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        out.setdefault(_structure_key(spec), []).append(i)
    return out


def evaluate_group(spec: dict, stacked: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and accuracy per model ([M], [M]) on a shared split, eval mode, no grad."""
    template = template_for(spec).eval()
    num_models = next(iter(stacked.values())).shape[0]
    batch_size = min(batch_size, MAX_EVAL_BATCH)  # results do not depend on it; cache-sized calls are faster
    chunk = models_per_call(spec, batch_size)
    loss_sum, correct = torch.zeros(num_models, dtype=torch.float64), torch.zeros(num_models, dtype=torch.float64)
    fn = vmapped(template, shared_input=True)
    with torch.no_grad():
        for m0 in range(0, num_models, chunk):
            part = {k: v[m0:m0 + chunk] for k, v in stacked.items()}
            params, buffers = split_params(template, part)
            for start in range(0, len(y), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                logits_MBK = fn(params, buffers, xb)
                losses = F.cross_entropy(logits_MBK.transpose(1, 2), yb.expand(logits_MBK.shape[0], -1),
                                         reduction="none")
                loss_sum[m0:m0 + chunk] += losses.sum(1).double()
                correct[m0:m0 + chunk] += (logits_MBK.argmax(-1) == yb).sum(1).double()
    n = max(len(y), 1)
    return (loss_sum / n).float(), (correct / n).float()
