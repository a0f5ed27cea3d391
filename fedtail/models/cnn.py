"""Small LeNet-style CNN for 28x28 / 32x32 images (MNIST, Fashion-MNIST, CIFAR) on the CPU."""

from __future__ import annotations

import torch
from torch import nn

from fedtail.registry import MODELS


class SmallCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"model 'cnn' needs (channels, height, width) inputs, got shape {input_shape}")
    return SmallCNN(input_shape, num_classes, hidden)
