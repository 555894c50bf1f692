"""The model zoo of the verify engine, built without torchvision.

Each builder is addressable as ``"verify.models:NAME"`` (the self-describing checkpoint stores that string and
the keyword arguments, so ``sharpness RUN/avg.pt`` rebuilds the model with no ``--arch``).

- :func:`mlp`: ``Flatten -> [Linear -> act] * len(hidden) -> Linear``; tanh/GELU are smooth (C^inf), the
  setting of Theorem 1; ReLU is exploratory only (paper section 7, pitfall 3).
- :func:`small_cnn`: three ``conv3x3 -> act -> maxpool2`` stages (widths w, 2w, 4w), a hidden Linear(., 2w)
  and the classifier; about 57k parameters at 32x32x3 with width 16. Optional BatchNorm after each conv.
- :func:`resnet18_micro`: ResNet-18 in the paper's CIFAR "micro" form (official ``networks/resnet_micro.py``):
  first conv 7x7 with stride 1 (2 -> 1), first max-pool 3x3 with stride 1 (2 -> 1), BasicBlocks [2, 2, 2, 2],
  BatchNorm, Kaiming (fan_out) initialisation of the convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "relu": nn.ReLU, "softplus": nn.Softplus}

__all__ = ["ACTIVATIONS", "BUILDERS", "has_batchnorm", "mlp", "resnet18_micro", "small_cnn"]


class ModelError(ValueError):
    """A bad model option; the message is one line naming the problem."""


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ModelError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] | int = (32,),
    num_classes: int = 10,
    activation: str = "tanh",
) -> nn.Sequential:
    """``f(x) = W_L act(... act(W_1 flatten(x) + b_1) ...) + b_L``; ``sum_l (n_{l-1} + 1) n_l`` parameters."""
    hidden = [int(hidden)] if isinstance(hidden, int) else [int(h) for h in hidden]
    if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
        raise ModelError(f"mlp sizes must be positive: in={in_features}, hidden={hidden}, out={num_classes}")
    layers: list[nn.Module] = [nn.Flatten()]
    prev = int(in_features)
    for h in hidden:
        layers += [nn.Linear(prev, h), _activation(activation)]
        prev = h
    layers.append(nn.Linear(prev, int(num_classes)))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Three conv stages and a two-layer head; accepts ``(n, C, H, W)`` or flat ``(n, C*H*W)`` inputs."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        image: int = 8,
        bn: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if image < 8:
            raise ModelError(f"small_cnn needs images of at least 8x8 (three 2x2 poolings); got {image}")
        self.in_channels, self.image = int(in_channels), int(image)
        chans = [int(in_channels), width, 2 * width, 4 * width]
        stages: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            stages.append(nn.Conv2d(a, b, 3, padding=1, bias=not bn))
            if bn:
                stages.append(nn.BatchNorm2d(b))
            stages += [_activation(activation), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages)
        side = image // 8
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * side * side, 2 * width),
            _activation(activation),
            nn.Linear(2 * width, int(num_classes)),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image, self.image)
        return self.head(self.features(x))


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 16,
    image: int = 8,
    bn: bool = False,
    activation: str = "relu",
) -> SmallCNN:
    """A small CNN (see :class:`SmallCNN`); about 57k parameters with width 16 at 32x32x3."""
    return SmallCNN(in_channels, num_classes, width, image, bn, activation)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions, as torchvision's."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNetMicro(nn.Module):
    """ResNet with BasicBlocks and the micro stem (stride-1 first conv and first max-pool)."""

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        stem_kernel: int = 7,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.conv1 = nn.Conv2d(
            in_channels, width, stem_kernel, stride=1, padding=stem_kernel // 2, bias=False
        )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        planes, blocks, inplanes = width, [], width
        for i, n in enumerate(layers):
            stage = []
            for k in range(n):
                stage.append(BasicBlock(inplanes, planes, stride=2 if (i > 0 and k == 0) else 1))
                inplanes = planes
            blocks.append(nn.Sequential(*stage))
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, int(num_classes))
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_micro(
    num_classes: int = 10, in_channels: int = 3, stem_kernel: int = 7, width: int = 64
) -> ResNetMicro:
    """ResNet-18 micro (11.2M parameters at width 64); ``stem_kernel=3`` gives the common CIFAR 3x3 stem
    instead of the official 7x7, ``width`` scales every stage (64, 128, 256, 512 at 64) for cheap tests."""
    if stem_kernel not in (3, 5, 7):
        raise ModelError(f"stem_kernel must be 3, 5 or 7; got {stem_kernel}")
    return ResNetMicro((2, 2, 2, 2), num_classes, in_channels, stem_kernel, width)


BUILDERS = {"mlp": mlp, "small_cnn": small_cnn, "cnn": small_cnn, "resnet18_micro": resnet18_micro}


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (running statistics updated in train mode)."""
    return any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in model.modules())
