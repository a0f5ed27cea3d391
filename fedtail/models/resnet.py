"""CIFAR-style ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2):
a 3x3 stem, three stages of n basic blocks with 16, 32, 64 channels (stride 1, 2, 2), global average
pooling; depth 6n + 2, so ``resnet8`` (n = 1) and ``resnet20`` (n = 3).

Two deliberate changes for federated training: GroupNorm (2 groups) instead of BatchNorm, following
Hsieh et al., "The Non-IID Data Quagmire of Decentralized Machine Learning" (ICML 2020), since averaging
BatchNorm statistics of clients with different label distributions hurts; and projection shortcuts
(1x1 conv, the paper's option B) where the shape changes. No buffers, so FedAvg averages every tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtail.registry import MODELS


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(2, channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(input_shape: tuple[int, ...], blocks: int) -> tuple[nn.Module, int]:
    if len(input_shape) != 3:
        raise ValueError(f"a ResNet needs (channels, height, width) inputs, got shape {input_shape}")
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], 16, 3, 1, 1, bias=False), _norm(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(blocks):
            layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    features = nn.Sequential(*layers)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return features, 64


@MODELS.register("resnet8")
def resnet8(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """ResNet-8 (one block per stage); ``hidden`` is unused (the width is the paper's 16-32-64)."""
    return cifar_resnet(input_shape, 1)


@MODELS.register("resnet20")
def resnet20(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """ResNet-20 (three blocks per stage); ``hidden`` is unused."""
    return cifar_resnet(input_shape, 3)
