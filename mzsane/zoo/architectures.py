"""The architecture registry: every network a zoo can hold, built by name.

Why a registry: zoo building, tokenization, permutation augmentation, alignment and evaluation all need
to agree on the same network for a name. One entry couples the builder with the function that describes
the network's permutation symmetries (consumed by ``mzsane.tokens.symmetries``), so adding an
architecture is one ``register(...)`` call.

State-dict key names are part of the contract: ``cnn_s``/``cnn_l`` use the Model Zoos ``module_list.<i>``
indices (so checkpoints from modelzoos.cc load), the ResNets use torchvision's names.

Pure torch: no Ray, fsspec or Prometheus imports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mzsane.errors import DataError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
INITS = ("default", "uniform", "normal", "kaiming_uniform", "kaiming_normal")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise DataError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# ----------------------------------------------------------------------------------------- CNNs


class SequentialNet(nn.Module):
    """A plain feed-forward net whose layers live in ``module_list`` (the Model Zoos key scheme)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.module_list = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_list(x)


def _cnn_s(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float) -> nn.Module:
    """Model Zoos CNN-s: Conv 8@5 -> pool -> act, Conv 6@5 -> pool -> act, Conv 4@2 -> act, FC 36->20->10.

    Dropout modules exist only when ``dropout > 0`` (Model Zoos behaviour), which shifts the key indices
    from 0,3,6,9,11 to 0,4,8,11,14.
    """
    size = _conv_out(_conv_out(_conv_out(image_size, 5) // 2, 5) // 2, 2)
    if size < 1:
        raise DataError(f"image_size={image_size} is too small for cnn_s; use image_size >= 16 (28 is standard)")
    drop = [nn.Dropout(dropout)] if dropout > 0 else []
    modules: list[nn.Module] = [
        nn.Conv2d(channels_in, 8, 5), nn.MaxPool2d(2, 2), _activation(activation), *drop,
        nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), _activation(activation), *drop,
        nn.Conv2d(6, 4, 2), _activation(activation), nn.Flatten(),
        nn.Linear(4 * size * size, 20), _activation(activation), *[nn.Dropout(dropout)] * bool(drop),
        nn.Linear(20, num_classes),
    ]
    return SequentialNet(modules)


def _cnn_l(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float) -> nn.Module:
    """Reference CNN3 ("CNN-l"): three 3x3 convs (16, 32, 15) each pool -> act -> Dropout, FC 60->20->10.

    Dropout modules are always present so keys are stable at 0, 4, 8, 13, 16.
    """
    size = _conv_out(_conv_out(_conv_out(image_size, 3) // 2, 3) // 2, 3) // 2
    if size < 1:
        raise DataError(f"image_size={image_size} is too small for cnn_l; use image_size >= 22 (32 is standard)")
    modules: list[nn.Module] = []
    for c_in, c_out in ((channels_in, 16), (16, 32), (32, 15)):
        modules += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2, 2), _activation(activation), nn.Dropout(dropout)]
    modules += [nn.Flatten(), nn.Linear(15 * size * size, 20), _activation(activation), nn.Dropout(dropout),
                nn.Linear(20, num_classes)]
    return SequentialNet(modules)


def _mlp(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float,
         width: int = 32, depth: int = 2) -> nn.Module:
    """Flatten -> ``depth`` hidden Linear+act (+Dropout when p>0) of ``width`` units -> Linear to classes."""
    modules: list[nn.Module] = [nn.Flatten()]
    fan_in = channels_in * image_size * image_size
    for _ in range(depth):
        modules += [nn.Linear(fan_in, width), _activation(activation)]
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
        fan_in = width
    modules.append(nn.Linear(fan_in, num_classes))
    return SequentialNet(modules)


# -------------------------------------------------------------------------------------- ResNets


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (two 3x3 convs + BN, identity or 1x1-conv+BN shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = _activation(activation)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act(out + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem without bias, no maxpool, stages of BasicBlocks, avgpool, fc.

    Key names match torchvision (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0/1, fc), which is what
    the permutation spec and the reference tokenization (spec 1.4) rely on.
    """

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], channels_in: int, num_classes: int,
                 activation: str, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = _activation(activation)
        self.dropout = dropout  # functional, before fc, so state_dict keys never change
        c_in = widths[0]
        for stage, (num, width) in enumerate(zip(blocks, widths)):
            layers = []
            for b in range(num):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(c_in, width, stride, activation))
                c_in = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = F.dropout(x, self.dropout, self.training)
        return self.fc(x)


def _resnet18(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float) -> nn.Module:
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), channels_in, num_classes, activation, dropout)


def _resnet18_gray(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float
                   ) -> nn.Module:
    """ResNet-18 at full width for 1x28x28 images: the CIFAR ResNet-18's token layout (BatchNorm tokens ~11% of
    43,924 tokens, against ~49% of resnet_mini's 490) on a dataset ``zoo build`` can make locally."""
    return _resnet18(channels_in, num_classes, image_size, activation, dropout)


def _resnet_mini(channels_in: int, num_classes: int, image_size: int, activation: str, dropout: float,
                 width: int = 16) -> nn.Module:
    """Demo-zoo ResNet: stem `width`, one block per stage at widths w, 2w, 2w (39,354 params at 16, 1x28x28)."""
    return ResNet((1, 1, 1), (width, 2 * width, 2 * width), channels_in, num_classes, activation, dropout)


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the net and which permutation-spec family describes it.

    ``perm_family`` names a spec builder in ``mzsane.tokens.symmetries`` ("sequential" for chains of
    conv/linear layers, "resnet" for torchvision-named ResNets); new families go there.
    """

    name: str
    builder: Callable[..., nn.Module]
    perm_family: str
    default_activation: str
    defaults: dict  # default channels_in / image_size for this architecture
    description: str


ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture (one call); its name becomes valid everywhere a name is accepted."""
    ARCHITECTURES[arch.name] = arch
    return arch


register(Architecture("cnn_s", _cnn_s, "sequential", "tanh", {"channels_in": 1, "image_size": 28},
                      "Model Zoos CNN-s, 2,464 params at 1x28x28"))
register(Architecture("cnn_l", _cnn_l, "sequential", "tanh", {"channels_in": 3, "image_size": 32},
                      "reference CNN3 / Model Zoos CNN-l, 10,853 params at 3x32x32"))
register(Architecture("resnet18", _resnet18, "resnet", "relu", {"channels_in": 3, "image_size": 32},
                      "CIFAR-style ResNet-18, 11,173,962 params at 10 classes"))
register(Architecture("resnet18_gray", _resnet18_gray, "resnet", "relu", {"channels_in": 1, "image_size": 28},
                      "ResNet-18 for 1x28x28 images, 11,172,810 params, 43,924 tokens (10.9% BatchNorm)"))
register(Architecture("resnet_mini", _resnet_mini, "resnet", "relu", {"channels_in": 1, "image_size": 28},
                      "small BatchNorm ResNet for the demo zoo"))
register(Architecture("mlp", _mlp, "sequential", "tanh", {"channels_in": 1, "image_size": 28},
                      "flatten -> hidden Linear layers -> classes"))


def get_architecture(arch: str) -> Architecture:
    """The registry entry for ``arch``; a DataError lists valid names otherwise."""
    if arch not in ARCHITECTURES:
        raise DataError(f"unknown architecture {arch!r}; use one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def init_weights(model: nn.Module, init: str, generator: torch.Generator | None = None) -> nn.Module:
    """Re-initialize Conv2d/Linear weights the Model Zoos way; biases become 0.01 (except ``default``).

    ``uniform`` is U(0,1) and ``normal`` N(0,1), not fan-scaled (Model Zoos meanings); the kaiming
    variants use PyTorch's defaults. BatchNorm keeps its default init. ``default`` leaves PyTorch's init.
    """
    if init not in INITS:
        raise DataError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
    if init == "default":
        return model
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            w = module.weight
            if init == "uniform":
                w.uniform_(0.0, 1.0, generator=generator)
            elif init == "normal":
                w.normal_(0.0, 1.0, generator=generator)
            elif init == "kaiming_uniform":
                nn.init.kaiming_uniform_(w, generator=generator)
            else:
                nn.init.kaiming_normal_(w, generator=generator)
            if module.bias is not None:
                module.bias.fill_(0.01)
    return model


def build_model(arch: str, *, channels_in: int | None = None, num_classes: int = 10, image_size: int | None = None,
                activation: str | None = None, dropout: float = 0.0, init: str = "default",
                generator: torch.Generator | None = None, **kw) -> nn.Module:
    """Build a registered architecture.

    ``channels_in``/``image_size``/``activation`` default per architecture (1x28x28 tanh for cnn_s/mlp,
    3x32x32 for cnn_l and resnet18, ReLU for the ResNets) so ``build_model("resnet18")`` is the reference
    net. Extra ``kw`` (``width``, ``depth``) go to builders that take them; unknown ones raise DataError.
    Initial weights come from the global torch RNG unless ``generator`` is given (used by ``init``).
    """
    entry = get_architecture(arch)
    channels_in = entry.defaults["channels_in"] if channels_in is None else int(channels_in)
    image_size = entry.defaults["image_size"] if image_size is None else int(image_size)
    activation = entry.default_activation if activation is None else activation
    if not 0.0 <= float(dropout) < 1.0:
        raise DataError(f"dropout={dropout} for {arch}; use a probability in [0, 1)")
    try:
        model = entry.builder(channels_in, num_classes, image_size, activation, float(dropout), **kw)
    except TypeError as err:
        raise DataError(f"bad arch_kwargs {sorted(kw)} for architecture {arch!r}: {err}; remove them") from None
    return init_weights(model, init, generator)


def num_params(model: nn.Module) -> int:
    """Trainable parameter count (what Model Zoos reports)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "ACTIVATIONS",
    "ARCHITECTURES",
    "INITS",
    "Architecture",
    "BasicBlock",
    "ResNet",
    "SequentialNet",
    "build_model",
    "get_architecture",
    "init_weights",
    "num_params",
    "register",
]
