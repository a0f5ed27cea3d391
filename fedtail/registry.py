"""Name -> plug-in registries.

Every kind of plug-in (dataset, partitioner, model, local objective, server strategy, continual method)
has one `Registry`. A registry knows which packages hold its plug-ins and imports them on first lookup, so
adding a method is one new file that calls ``@REGISTRY.register("name")`` — the loop never changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A name that no plug-in registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to plug-ins, filled by importing the packages that define them."""

    def __init__(self, kind: str, packages: Iterable[str] = ()) -> None:
        self.kind = kind
        self._packages = tuple(packages)
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (lower-case, unique)."""

        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package in self._packages:
            pkg = importlib.import_module(package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{package}.{mod.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name.lower()]
        except KeyError:
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return isinstance(name, str) and name.lower() in self._items


DATASETS: Registry = Registry("dataset", ["fedtail.datasets"])
PARTITIONERS: Registry = Registry("partitioner", ["fedtail.partition"])
MODELS: Registry = Registry("model", ["fedtail.models"])
OBJECTIVES: Registry = Registry("local objective", ["clients.objectives"])
CONTINUAL: Registry = Registry("continual method", ["clients.continual"])
STRATEGIES: Registry = Registry("strategy", ["strategies"])
ENGINES: Registry = Registry("engine", ["fedtail.engines"])
