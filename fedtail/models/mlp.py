"""Two-hidden-layer MLP for flat inputs (digits 8x8, MNIST-1D): tiny enough for 2 CPU cores."""

from __future__ import annotations

import math

from torch import nn

from fedtail.registry import MODELS


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    """Features: flatten, two ReLU layers of width ``hidden``."""
    features = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
    )
    return features, hidden
