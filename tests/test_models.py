"""The model surface: every registered model is features + classifier, the cosine classifier's math,
the ResNets' depth, and the MLP's weights unchanged by the split (same seed, same numbers as before)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedtail.models import CosineLinear, build_model
from fedtail.registry import MODELS

SHAPES = {"mlp": (64,), "cnn1d": (40,), "cnn": (3, 32, 32), "resnet8": (3, 32, 32), "resnet20": (1, 28, 28)}


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_every_model_is_features_then_classifier(name: str, classifier: str) -> None:
    shape = SHAPES[name]
    model = build_model(name, shape, 10, 32, seed=0, classifier=classifier).eval()
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 10)
    torch.testing.assert_close(logits, model.classifier(model.features(x)), rtol=0, atol=0)
    again = build_model(name, shape, 10, 32, seed=0, classifier=classifier)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert not list(model.buffers())  # nothing FedAvg cannot average (no BatchNorm statistics)


def test_cosine_classifier_is_scaled_cosine_similarity() -> None:
    head = CosineLinear(3, 2, scale=30.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    expected = torch.tensor([[30.0, 30.0 / math.sqrt(2)], [0.0, 0.0]])
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(head(7.0 * x), head(x))  # invariant to the feature norm


def test_resnet_depths_follow_6n_plus_2() -> None:
    for name, n in (("resnet8", 1), ("resnet20", 3)):
        model = build_model(name, (3, 32, 32), 10, 1, seed=0)
        convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) + 1 == 6 * n + 2  # 3x3 convs + the classifier (projections are 1x1)


def test_mlp_weights_are_those_of_the_unsplit_mlp() -> None:
    """Splitting into features + classifier kept the initialisation order: runs give the same numbers."""
    torch.manual_seed(5)
    before = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    model = build_model("mlp", (64,), 10, 16, seed=5)
    for a, b in zip(before.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cnn1d_is_mnist1d_papers_convbase() -> None:
    """Greydanus & Kobak's ConvBase at 25 channels on 40-point signals: lengths 40 -> 19 -> 10 -> 5,
    125 features, 5,210 parameters with the 10-class linear classifier (as in the official code)."""
    import torch

    from fedtail.models import build_model

    model = build_model("cnn1d", (40,), 10, 25, seed=0)
    x = torch.randn(3, 40)
    lengths = []
    h = x.reshape(3, 1, 40)
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, torch.nn.Conv1d):
            lengths.append(h.shape[-1])
    assert lengths == [19, 10, 5]
    assert model.features(x).shape == (3, 125) and model(x).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 5210


def test_mlp_depth_sets_its_hidden_layers_and_other_models_refuse_it() -> None:
    from fedtail.config import ConfigError, build_config

    for depth in (1, 4):
        model = build_model("mlp", (64,), 10, 16, seed=0, depth=depth)
        assert [m.out_features for m in model.features if isinstance(m, nn.Linear)] == [16] * depth
    default = build_model("mlp", (64,), 10, 16, seed=0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            default.state_dict().values(),
            build_model("mlp", (64,), 10, 16, seed=0, depth=2).state_dict().values(),
            strict=True,
        )
    )
    assert build_config({"model": {"depth": 3}}).model.depth == 3  # digits: auto is the mlp
    with pytest.raises(
        ConfigError, match="model.depth=3 sets the mlp's hidden layers, but the model is 'cnn1d'"
    ):
        build_config({"model": {"name": "cnn1d", "depth": 3}})
