"""Byzantine clients for robustness experiments: a seeded share of the clients (``attack.fraction``, the
same ones for the whole run) replace their trained update by a corrupted one, registered by name in
`fedtail.registry.ATTACKS`. Off by default (``attack.name: none``).

An attack sees the model the client received (x) and the one it trained (y), both as arrays by name,
and returns what the client sends instead; its randomness comes from the generator it is given (seeded
per run, task, round and client, so every engine sends the same corruption).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np

from fedtail.registry import ATTACKS, PluginOptions

Arrays = dict[str, np.ndarray]


class Attack:
    """Base class: the honest update (no attack)."""

    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions) -> None:
        self.options = options

    def corrupt(self, received: Arrays, trained: Arrays, rng: np.random.Generator) -> Arrays:
        """What the client sends instead of ``trained``."""
        return trained


@ATTACKS.register("none")
class NoAttack(Attack):
    """Every client is honest."""

    class Options(PluginOptions):
        """No settings."""


@functools.lru_cache(maxsize=16)
def attackers(seed: int, num_clients: int, fraction: float) -> frozenset[int]:
    """The partition ids that attack: ``round(fraction * num_clients)`` of them, a seeded choice."""
    k = round(fraction * num_clients)
    rng = np.random.default_rng([seed, 0xA77AC])
    return frozenset(int(p) for p in rng.choice(num_clients, size=k, replace=False))


def floating(name: str, array: np.ndarray) -> bool:
    """Whether an array is a weight an attack changes (integer buffers such as counters are kept)."""
    return np.issubdtype(array.dtype, np.floating)
