"""Name -> plug-in registries.

Every kind of plug-in (dataset, partitioner, model, local objective, server strategy, continual method)
has one `Registry`. A registry knows which packages hold its plug-ins and imports them on first lookup, so
adding a method is one new file that calls ``@REGISTRY.register("name")`` — the loop never changes.

A plug-in that takes settings declares them as a class attribute ``Options``, a `PluginOptions` model
(names, types, defaults, bounds); the config checks ``strategy.options`` / ``train.options`` /
``continual.options`` against it before any work. A plug-in without ``Options`` accepts none.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A name that no plug-in registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class PluginOptions(BaseModel):
    """Base of a plug-in's ``Options``: unknown names, non-finite floats and bool-for-number refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def describe_options(model: type[BaseModel]) -> str:
    """``'mu: float = 0.01, mode: Literal['a', 'b'] = 'a''`` (or ``'none'``), for error messages."""
    parts = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        kind = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        kind = kind or str(ann).replace("typing.", "")
        default = "required" if field.is_required() else f"= {field.get_default(call_default_factory=True)!r}"
        parts.append(f"{name}: {kind} {default}")
    return ", ".join(parts) or "none"


def check_options(registry: Registry, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` validated against plug-in ``name``'s ``Options``; returns them typed, defaults filled.

    Raises ValueError naming the bad option and listing every accepted one with its type and default.
    """
    model = registry.options(name)
    try:
        return model.model_validate(options).model_dump()
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown option {where!r}")
            elif where:
                problems.append(f"option {where!r}: {e['msg']} (got {e.get('input')!r})")
            else:  # a rule over several options
                problems.append(f"{e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
        raise ValueError(
            f"{'; '.join(problems)}; {registry.kind} {name!r} accepts: {describe_options(model)}"
        ) from None


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

    def options(self, name: str) -> type[PluginOptions]:
        """The ``Options`` model plug-in ``name`` declares (none declared: accepts no options)."""
        model = getattr(self.get(name), "Options", PluginOptions)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"{self.kind} {name!r}: Options must be a PluginOptions subclass, got {model!r}")
        return model

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
ADJUSTMENTS: Registry = Registry("evaluation-time adjustment", ["server.adjustments"])
ATTACKS: Registry = Registry("attack", ["clients.attacks"])
AUGMENTATIONS: Registry = Registry("augmentation", ["clients.augment"])
SEMISUP: Registry = Registry("semi-supervised method", ["clients.semisup"])
