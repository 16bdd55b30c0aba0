"""Neuron-permutation symmetries of every registered architecture: which permutation group acts on which
axis of which state_dict key, and applying a draw to tensors and state_dicts (spec 5.1).

Why: permuting hidden neurons (a layer's output channels together with its bias, its BatchNorm affine
params and running stats, and the next layer's input channels) leaves a network's function unchanged.
Training draws a fresh permutation per sample as the second contrastive view (``permutations.py``, in
token space); alignment (weight matching, ``alignment.py``) uses the same groups to bring models into a
common basis for soups and novelty.

A ``PermSpec`` names, for every state_dict key, the permutation group acting on axis 0 (outputs) and
axis 1 (inputs). Flatten block expansion needs no special case: when a Linear's inputs are ``G * b``
for an input group of size ``G``, each channel owns a block of ``b`` consecutive inputs. ResNets share
one group per stage across the residual stream (stem/shortcut/conv2/bn2 of that stage); block-internal
channels (conv1/bn1) are free. Final outputs are never permuted.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mzsane.errors import DataError

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class PermSpec:
    """Group sizes and, per key, the group acting on each axis (None = not permuted)."""

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]

    def members(self) -> dict[str, list[tuple[str, int]]]:
        """group -> [(key, axis)] it acts on."""
        out: dict[str, list[tuple[str, int]]] = {g: [] for g in self.sizes}
        for key, groups in self.axes.items():
            for axis, g in enumerate(groups):
                if g is not None:
                    out[g].append((key, axis))
        return out


def _finish(axes: dict[str, tuple[str | None, ...]], shapes: Shapes) -> PermSpec:
    sizes: dict[str, int] = {}
    for key, groups in axes.items():
        if groups and groups[0] is not None:
            size = int(shapes[key][0])
            assert sizes.setdefault(groups[0], size) == size, f"inconsistent size of group {groups[0]} at {key}"
    return PermSpec(sizes, {k: v for k, v in axes.items() if any(g is not None for g in v)})


def sequential_spec(shapes: Shapes) -> PermSpec:
    """Chain of conv/linear layers (cnn_s, cnn_l, mlp): layer i's outputs are layer i+1's inputs."""
    weights = [k for k in shapes if k.rsplit(".", 1)[-1] == "weight"]
    axes: dict[str, tuple[str | None, ...]] = {}
    prev: str | None = None
    for i, key in enumerate(weights):
        if len(shapes[key]) < 2 or (i > 0 and shapes[key][1] % shapes[weights[i - 1]][0]):
            raise DataError(f"{key} {list(shapes[key])} does not continue a plain conv/linear chain; "
                            "register a permutation spec family for this architecture")
        out = f"P{i}" if i < len(weights) - 1 else None
        axes[key] = (out, prev)
        module = key[: -len("weight")]
        for name in ("bias", "running_mean", "running_var"):
            if module + name in shapes:
                axes[module + name] = (out,)
        prev = out
    return _finish(axes, shapes)


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(\w+)$")


def resnet_spec(shapes: Shapes) -> PermSpec:
    """torchvision-named BasicBlock ResNets: one residual-stream group per stage, block inner groups free."""
    stages = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    stream: dict[int, str] = {}
    for s in stages:  # a stage without a projection shortcut continues the previous stage's stream
        has_proj = f"layer{s}.0.downsample.0.weight" in shapes
        stream[s] = stream[s - 1] if (s - 1 in stream and not has_proj) else f"stream{s}"
    first = stream[stages[0]] if stages else "stream1"
    axes: dict[str, tuple[str | None, ...]] = {}
    for key, shape in shapes.items():
        module, _, name = key.rpartition(".")
        if name == "num_batches_tracked":
            continue
        if module in ("conv1", "bn1"):
            axes[key] = (first, None) if len(shape) > 1 else (first,)
        elif module == "fc":
            axes[key] = (None, stream[stages[-1]] if stages else first) if len(shape) > 1 else (None,)
        elif m := _BLOCK.match(key):
            s, b, part = int(m.group(1)), int(m.group(2)), m.group(3)
            into = stream[s - 1] if (b == 0 and s - 1 in stream) else stream[s]
            if b == 0 and s == stages[0]:
                into = first
            inner = f"inner{s}.{b}"
            out = inner if part in ("conv1", "bn1") else stream[s]
            src = {"conv1": into, "conv2": inner, "downsample.0": into}.get(part)
            axes[key] = (out, src) if len(shape) > 1 else (out,)
        else:
            raise DataError(f"{key} is not a torchvision-style ResNet key; use an architecture whose permutation "
                            "spec family matches the checkpoint")
    return _finish(axes, shapes)


SPEC_FAMILIES: dict[str, Callable[[Shapes], PermSpec]] = {"sequential": sequential_spec, "resnet": resnet_spec}


def spec_builder(arch: str | Callable[[Shapes], PermSpec]) -> Callable[[Shapes], PermSpec]:
    """The spec builder of a registered architecture name (or a builder passed through)."""
    if callable(arch):
        return arch
    from mzsane.zoo.architectures import get_architecture

    return SPEC_FAMILIES[get_architecture(arch).perm_family]


def permute_tensor(t: torch.Tensor, groups: tuple[str | None, ...], perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """new[i, j*b + s] = old[p_out[i], p_in[j]*b + s]: the gather convention used everywhere here."""
    if groups[0] is not None:
        t = t.index_select(0, perms[groups[0]])
    if len(groups) > 1 and groups[1] is not None:
        p = perms[groups[1]]
        t = t.reshape(t.shape[0], p.numel(), -1).index_select(1, p).reshape(t.shape)
    return t


def permute_state_dict(state_dict: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
                       spec: PermSpec) -> dict[str, torch.Tensor]:
    """Apply ``perms`` (group -> LongTensor) to every key the spec covers; other keys are cloned."""
    return {k: (permute_tensor(v, spec.axes[k], perms) if k in spec.axes else v).clone()
            for k, v in state_dict.items()}


__all__ = ["SPEC_FAMILIES", "PermSpec", "permute_state_dict", "resnet_spec", "sequential_spec", "spec_builder"]
