"""SMOTE minority oversampling of a client's local data (Chawla et al., "SMOTE: Synthetic Minority
Over-sampling Technique", JAIR 2002), through imbalanced-learn.

Each minority class gets synthetic samples ``x_i + u (x_nn - x_i)``, ``u ~ U(0, 1)``, between a sample and
one of its ``k`` nearest neighbours of the same class, until every class the client holds has as many
samples as its largest class (imbalanced-learn's ``sampling_strategy="auto"``). Interpolating raw inputs
makes sense for flat, tabular-like inputs (digits' 64 pixels, MNIST-1D's 40 values); for images the
interpolation happens in the model's feature space instead (`smote_features`), where nearby points are
semantically close, and the synthetic features train the classifier.
"""

from __future__ import annotations

import numpy as np
import torch
from imblearn.over_sampling import SMOTE, RandomOverSampler


def smote(x: np.ndarray, y: np.ndarray, k_neighbors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` followed by the synthetic samples (originals first, unchanged, in order).

    imbalanced-learn needs ``k + 1`` samples in a class to interpolate; a class with fewer uses
    ``k = its size - 1`` (the same for all, as imbalanced-learn takes one ``k``), and a class with a single
    sample has no neighbour: it is duplicated instead (`RandomOverSampler`). Nothing to do when the
    client holds one class or all its classes are equally large.
    """
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2 or counts.min() == counts.max():
        return x, y
    flat = x.reshape(len(x), -1)
    target = int(counts.max())
    pairs = [(c, n) for c, n in zip(classes.tolist(), counts.tolist(), strict=True) if n < target]
    interpolated = {c: target for c, n in pairs if n >= 2}
    duplicated = {c: target for c, n in pairs if n == 1}
    new_x, new_y = [], []
    if interpolated:
        k = min(k_neighbors, min(int(n) for c, n in pairs if c in interpolated) - 1)
        sampler = SMOTE(sampling_strategy=interpolated, k_neighbors=k, random_state=seed)
        xs, ys = sampler.fit_resample(flat, y)
        new_x.append(xs[len(y) :])
        new_y.append(ys[len(y) :])
    if duplicated:
        sampler = RandomOverSampler(sampling_strategy=duplicated, random_state=seed)
        xs, ys = sampler.fit_resample(flat, y)
        new_x.append(xs[len(y) :])
        new_y.append(ys[len(y) :])
    synthetic = np.concatenate(new_x).astype(x.dtype, copy=False).reshape(-1, *x.shape[1:])
    return np.concatenate([x, synthetic]), np.concatenate([y, np.concatenate(new_y).astype(y.dtype)])


def is_flat(x: torch.Tensor) -> bool:
    """Inputs that are vectors (SMOTE on inputs) rather than images or sequences with channels."""
    return x.dim() == 2


@torch.no_grad()
def smote_features(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, k_neighbors: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic *features* (and labels) for the minority classes, from ``model.features`` of the round's
    samples: the classifier trains on them beside the real samples (feature-space SMOTE)."""
    was_training = model.training
    model.eval()
    feats = torch.cat([model.features(xb) for xb in x.split(4096)])
    model.train(was_training)
    f, labels = feats.cpu().numpy(), y.cpu().numpy()
    fs, ys = smote(f, labels, k_neighbors, seed)
    return torch.from_numpy(fs[len(f) :]).to(feats.device), torch.from_numpy(ys[len(f) :]).to(y.device)
