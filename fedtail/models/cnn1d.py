"""The 1-D CNN for flat signals of MNIST-1D's paper (Greydanus & Kobak, "Scaling Down Deep Learning with
MNIST-1D", ICML 2024): three convolutions over the signal, each halving its length, then the classifier
on the flattened maps. The official code (greydanus/mnist1d) calls it ``ConvBase``; the paper reports
about 94 % test accuracy for it on MNIST-1D against about 68 % for an MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedtail.registry import MODELS


class _AsSignal(nn.Module):
    """(N, L) -> (N, 1, L): a flat sample is a one-channel signal."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], 1, -1)


@MODELS.register("cnn1d")
def cnn1d(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """Features: conv 5 / stride 2 / padding 1, then two conv 3 / stride 2 / padding 1, ``hidden``
    channels each (the paper: 25), ReLU after each, flattened (for MNIST-1D's 40 points: 5 x hidden)."""
    length = math.prod(input_shape)
    features = nn.Sequential(
        _AsSignal(),
        nn.Conv1d(1, hidden, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(hidden, hidden, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(hidden, hidden, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    with torch.no_grad():
        width = features(torch.zeros(1, length)).shape[1]
    return features, width
