"""SE-ResNet family, written from the paper, with timm-compatible module names.

Hu, Shen, Albanie, Sun, Wu, *Squeeze-and-Excitation Networks*, CVPR 2018 / TPAMI 2019
(https://arxiv.org/abs/1709.01507). He, Zhang, Ren, Sun, *Deep Residual Learning for Image
Recognition*, CVPR 2016 (https://arxiv.org/abs/1512.03385). Xie et al., *Aggregated Residual
Transformations for Deep Neural Networks* (ResNeXt), CVPR 2017.

Module and parameter names follow timm's ``resnet.py`` (``conv1``/``bn1``/``layer1..4``/``fc``;
blocks with ``conv*``/``bn*``/``se``/``downsample``; SE as ``se.fc1``/``se.fc2`` 1x1 convs), so a
timm ``seresnet*`` state dict loads with strict key checking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from export.errors import ExportError

BlockKind = Literal["basic", "bottleneck"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``divisor``), as timm does
    for SE reduction widths, so our parameter shapes equal timm's."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation block (Hu et al. 2018, Fig. 1 and Eq. 2-4).

    squeeze: global average pool per channel (Eq. 2); excitation: FC C->C/r, ReLU, FC C/r->C,
    sigmoid (Eq. 3); scale: multiply each channel of the input by its gate (Eq. 4). The FCs are
    1x1 convolutions (as in timm's ``SEModule``), which keeps the gate in NCHW.
    """

    def __init__(self, channels: int, reduction: int = 16, divisor: int = 8) -> None:
        super().__init__()
        reduced = make_divisible(channels / reduction, divisor)
        self.fc1 = nn.Conv2d(channels, reduced, kernel_size=1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, kernel_size=1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.bn(self.fc1(s))))
        return x * self.gate(s)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (He et al. 2016, Fig. 2); SE on the residual branch before the
    identity is added (Hu et al. 2018, Fig. 3)."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        use_se: bool = True,
        cardinality: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only cardinality=1 and base_width=64")
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcitation(planes) if use_se else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.se is not None:
            y = self.se(y)
        return self.act2(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand x4 (He et al. 2016, Fig. 5; Xie et al.
    2017); SE on the expanded branch before the identity is added (Hu et al. 2018, Fig. 3)."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        planes: int,
        stride: int = 1,
        use_se: bool = True,
        cardinality: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64)) * cardinality
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcitation(out_ch) if use_se else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.se is not None:
            y = self.se(y)
        return self.act3(y + shortcut)


class SEResNet(nn.Module):
    """ResNet trunk with optional SE in every block.

    ``stem="imagenet"`` is the 7x7/2 conv + 3x3/2 max-pool of He et al.; ``stem="cifar"`` is a
    single 3x3/1 conv and no pool, for small inputs such as 28x28 Fashion-MNIST.
    """

    conv1: nn.Conv2d
    fc: nn.Linear

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_chans: int = 3,
        use_se: bool = True,
        cardinality: int = 1,
        base_width: int = 64,
        stem: Literal["imagenet", "cifar"] = "imagenet",
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        stem_ch = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_ch, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_ch, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.act1 = nn.ReLU(inplace=True)

        in_ch = stem_ch
        for i, (depth, planes) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, planes, stride, use_se, cardinality, base_width))
                in_ch = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each residual branch (Goyal et al. 2017): every block starts
        # as the identity, which speeds early training.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_pool(self.forward_features(x)), 1))


@dataclass(frozen=True)
class ArchSpec:
    """How to build one named architecture; ``defaults`` are its input geometry."""

    block: type[BasicBlock] | type[Bottleneck]
    layers: tuple[int, ...]
    use_se: bool = True
    widths: tuple[int, ...] = (64, 128, 256, 512)
    cardinality: int = 1
    base_width: int = 64
    stem: Literal["imagenet", "cifar"] = "imagenet"
    defaults: Mapping[str, int] = field(
        default_factory=lambda: {"in_chans": 3, "num_classes": 1000, "img_size": 224}
    )


_CIFAR = {"in_chans": 1, "num_classes": 10, "img_size": 28}

ARCHITECTURES: dict[str, ArchSpec] = {
    "seresnet18": ArchSpec(BasicBlock, (2, 2, 2, 2)),
    "seresnet34": ArchSpec(BasicBlock, (3, 4, 6, 3)),
    "seresnet50": ArchSpec(Bottleneck, (3, 4, 6, 3)),
    "seresnet101": ArchSpec(Bottleneck, (3, 4, 23, 3)),
    "seresnet152": ArchSpec(Bottleneck, (3, 8, 36, 3)),
    "seresnext50_32x4d": ArchSpec(Bottleneck, (3, 4, 6, 3), cardinality=32, base_width=4),
    "resnet18": ArchSpec(BasicBlock, (2, 2, 2, 2), use_se=False),
    "resnet50": ArchSpec(Bottleneck, (3, 4, 6, 3), use_se=False),
    # Small CIFAR-style nets for 28x28 inputs: 3 stages x 2 basic blocks, widths 16/32/64.
    "seresnet14_cifar": ArchSpec(
        BasicBlock, (2, 2, 2), widths=(16, 32, 64), stem="cifar", defaults=_CIFAR
    ),
    "resnet14_cifar": ArchSpec(
        BasicBlock, (2, 2, 2), widths=(16, 32, 64), stem="cifar", use_se=False, defaults=_CIFAR
    ),
}


class UnknownArchitectureError(ExportError, ValueError):
    pass


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; choose one of: {known}"
        ) from None


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm random affine parameters and running statistics.

    Training init zeroes the last BN of each block, which makes a fresh net's SE gates
    irrelevant to its output; a test or benchmark net must exercise every block, so its
    statistics are drawn to keep activations in a sane range instead.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.empty(c).uniform_(0.2, 0.6, generator=generator))
                m.bias.copy_(torch.empty(c).uniform_(-0.1, 0.1, generator=generator))
                assert m.running_mean is not None and m.running_var is not None  # tracked stats
                m.running_mean.copy_(torch.empty(c).uniform_(-0.1, 0.1, generator=generator))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=generator))


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BN's running statistics to those of ``images`` (data-dependent init).

    A deep net with random weights maps every input to nearly the same logits; with
    statistics measured on real images its activations stay normalised, so its outputs tell
    images apart — what tests and benchmarks of a random-weight net need.
    """
    saved = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for m in saved:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this one pass
    model.train()
    with torch.no_grad():
        model(images)
    for m, momentum in saved.items():
        m.momentum = momentum
    model.eval()


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    seed: int | None = None,
    init: Literal["train", "random"] = "train",
) -> SEResNet:
    """Build ``name`` in eval mode.

    ``init="train"`` is the initialisation to train from (zero-init residual BNs);
    ``init="random"`` also randomises BN statistics so every block, SE included, shapes the
    output (for tests and benchmarks). ``seed`` makes either reproducible.
    """
    spec = arch_spec(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = SEResNet(
        spec.block,
        spec.layers,
        widths=spec.widths,
        num_classes=num_classes if num_classes is not None else spec.defaults["num_classes"],
        in_chans=in_chans if in_chans is not None else spec.defaults["in_chans"],
        use_se=spec.use_se,
        cardinality=spec.cardinality,
        base_width=spec.base_width,
        stem=spec.stem,
    )
    if init == "random":
        randomize_batchnorm(model, torch.Generator().manual_seed(seed or 0))
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass over conv and linear layers (the usual
    GMACs figure; BN, activations and pooling are not counted)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out.numel() // out.shape[0] * k

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total
