"""The exemplar-free distribution-based classifier: ISDA's margin logits, class statistics summed over
clients, the server's classifier fit, and that clients keep nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.continual.memory import features_of
from clients.continual.prototype import PrototypeClassifier, fit_global_classifier, margin_logits
from clients.local import ClientData
from fedtail.config import ConfigError, build_config
from fedtail.models import array_to_numpy, build_model, to_arrays
from tests.conftest import local_context


def test_margin_logits_are_isda_bound_with_a_diagonal_covariance() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    b = torch.tensor([0.1, -0.2, 0.0])
    mu = torch.tensor([[0.5, 0.5], [1.0, -1.0], [0.0, 0.0]])
    var = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]])
    lam = torch.tensor([2.5, 1.0, 1.0])
    out = margin_logits(w, b, mu, var, lam)
    for y in range(3):
        for j in range(3):
            d = w[j] - w[y]
            want = float(w[j] @ mu[y] + b[j] + 0.5 * lam[y] * (d * var[y] * d).sum())
            assert float(out[y, j]) == pytest.approx(want, rel=1e-6)
    assert torch.allclose(torch.diagonal(out), (mu * w).sum(1) + b)  # no margin on a class's own logit
    torch.testing.assert_close(out[2], mu[2] @ w.T + b)  # no spread: plain logits at the mean


def test_the_bound_is_above_the_sampled_expected_cross_entropy_and_tight_for_small_spread() -> None:
    """ISDA's eq. 8 bounds E_f[CE] for f ~ N(mu, Sigma) from above (Jensen); the gap closes as the
    spread shrinks."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    mu = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(200_000, 4, generator=gen, dtype=torch.float64)
    for spread, tolerance in ((0.3, None), (0.01, 0.02)):
        var = torch.full((3, 4), spread, dtype=torch.float64)
        f = mu + spread**0.5 * noise
        sampled = torch.nn.functional.cross_entropy(f @ w.T + b, torch.zeros(len(f), dtype=torch.int64))
        full = margin_logits(w, b, mu.repeat(3, 1), var, torch.ones(3, dtype=torch.float64))
        bound = torch.nn.functional.cross_entropy(full[:1], torch.tensor([0]))
        assert float(bound) >= float(sampled) - 1e-3
        if tolerance is not None:
            assert float(bound) == pytest.approx(float(sampled), rel=tolerance)


def test_the_server_fit_separates_class_distributions_equally_weighted() -> None:
    means = np.array([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    variances = np.array([[0.5, 0.5], [0.5, 0.5], [4.0, 4.0]])
    w0, b0 = np.zeros((3, 2)), np.zeros(3)
    w, b, loss = fit_global_classifier(w0, b0, means, variances, np.array([2.5, 1.0, 1.0]), 300, 0.05)
    logits = means @ w.T + b
    assert logits.argmax(axis=1).tolist() == [0, 1, 2]
    start = torch.nn.functional.cross_entropy(torch.zeros(3, 3), torch.arange(3))
    assert loss < float(start) / 2


def _client(seed: int) -> ClientData:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 5 + seed)
    x = (rng.normal(size=(y.size, 5)) + y[:, None]).astype(np.float32)
    return ClientData(x=x, y=y, x_unlabeled=np.zeros((0, 5), np.float32))


def test_class_statistics_summed_over_clients_are_the_pooled_mean_and_variance() -> None:
    cfg = build_config({"continual": {"method": "prototype"}})
    model = build_model("mlp", (5,), 10, 8, 0).eval()
    sums, datas = [], [_client(0), _client(1)]
    for pid, data in enumerate(datas):
        ctx = local_context(
            cfg, model, data=data, task=1, task_classes=[2, 3], seen_classes=[0, 1, 2, 3],
            sample_index=data.positions([2, 3]), partition_id=pid, state=RecordDict(),
        )  # fmt: skip
        sums.append(PrototypeClassifier(ctx).task_statistics({}, 0))
    total = {k: sums[0][k] + sums[1][k] for k in sums[0]}
    old_head = {
        "means": np.ones((10, 8)), "variances": np.full((10, 8), 0.5),
        "counts": np.array([5.0, 5.0] + [0.0] * 8),
    }  # fmt: skip
    arrays = to_arrays(model)
    out, head = PrototypeClassifier.head_from_statistics(
        total, old_head, 0, arrays=arrays, old=[0, 1], new=[2, 3], options=PrototypeClassifier.Options()
    )
    for c in (2, 3):
        phi = np.concatenate([features_of(model, d.x[d.y == c], torch.device("cpu")) for d in datas])
        np.testing.assert_allclose(head["means"][c], phi.mean(axis=0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(head["variances"][c], phi.var(axis=0), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(head["means"][:2], 1.0)  # old classes' statistics are kept as they were
    assert head["counts"][:4].tolist() == [5, 5, 11, 11]
    weight, before = array_to_numpy(out["classifier.weight"]), array_to_numpy(arrays["classifier.weight"])
    assert not np.allclose(weight[:4], before[:4]) and np.array_equal(weight[4:], before[4:])
    assert PrototypeClassifier.memory_footprint(ctx) == (0, 0)


def test_a_cosine_head_is_refused() -> None:
    with pytest.raises(ConfigError, match="model.classifier='cosine'.*use linear"):
        build_config({"continual": {"method": "prototype"}, "model": {"classifier": "cosine"}})


def test_a_client_absent_from_the_task_sends_no_statistics() -> None:
    """Per-client arrival: a client that skipped the task never received its data, whatever its
    partition holds, so it adds nothing to the new classes' statistics."""
    cfg = build_config({"continual": {"method": "prototype"}})
    model = build_model("mlp", (5,), 10, 8, 0).eval()
    data = _client(0)
    ctx = local_context(
        cfg, model, data=data, task=1, task_classes=[2, 3], seen_classes=[0, 1, 2, 3],
        sample_index=data.positions([2, 3]), held_classes=[0, 1], state=RecordDict(),
    )  # fmt: skip
    sums = PrototypeClassifier(ctx).task_statistics({}, 0)
    assert sums["counts"].sum() == 0 and not sums["feature-sums"].any()
