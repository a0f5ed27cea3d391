"""Model plug-ins (registered in `fedtail.registry.MODELS`) and array (de)serialisation helpers.

A model builder takes ``(input_shape, num_classes, hidden)`` and returns an ``nn.Module`` whose forward
gives logits over all classes of the dataset (class-incremental learning keeps one growing head view:
logits of unseen classes exist but are masked by the methods that need it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedtail.registry import MODELS


def build_model(name: str, input_shape: Sequence[int], num_classes: int, hidden: int, seed: int) -> nn.Module:
    """Build a registered model with seeded initial weights (the server's round-0 model)."""
    builder = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(input_shape), num_classes, hidden)


def to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; code stays device-agnostic."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device='cuda' but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)
