"""Small LeNet-style CNN for 28x28 / 32x32 images (MNIST, Fashion-MNIST, CIFAR) on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from fedtail.registry import MODELS


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """Features: two 5x5 conv + max-pool stages (16, 32 channels), then a ReLU layer of width ``hidden``."""
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' needs (channels, height, width) inputs, got shape {input_shape}")
    conv = nn.Sequential(
        nn.Conv2d(input_shape[0], 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    with torch.no_grad():
        flat = conv(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*conv, nn.Linear(flat, hidden), nn.ReLU()), hidden
