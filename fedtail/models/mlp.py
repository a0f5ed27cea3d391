"""MLP for flat inputs (digits 8x8, MNIST-1D), two hidden layers unless ``model.depth`` says otherwise:
tiny enough for 2 CPU cores."""

from __future__ import annotations

import math

from torch import nn

from fedtail.registry import MODELS


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], hidden: int, depth: int = 2) -> tuple[nn.Module, int]:
    """Features: flatten, ``depth`` ReLU layers of width ``hidden``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers), hidden
