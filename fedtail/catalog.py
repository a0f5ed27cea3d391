"""What is available: every registered plug-in with a one-line description, the paper it implements and
its options with their defaults, read from the registries (`fedtail list`), so a new plug-in appears by
itself. Pure functions over the registries; the CLI prints them."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from fedtail.registry import (
    ADJUSTMENTS,
    ATTACKS,
    AUGMENTATIONS,
    CONTINUAL,
    DATASETS,
    ENGINES,
    MODELS,
    OBJECTIVES,
    PARTITIONERS,
    SEMISUP,
    STRATEGIES,
    Registry,
    describe_options,
)

KINDS: dict[str, tuple[Registry, str]] = {
    "datasets": (DATASETS, "dataset.name"),
    "partitioners": (PARTITIONERS, "partition.method"),
    "models": (MODELS, "model.name"),
    "objectives": (OBJECTIVES, "train.objective (options: train.options)"),
    "strategies": (STRATEGIES, "strategy.name (options: strategy.options)"),
    "continual": (CONTINUAL, "continual.method (options: continual.options)"),
    "adjustments": (ADJUSTMENTS, "evaluation.adjustment (options: evaluation.options)"),
    "attacks": (ATTACKS, "attack.name (options: attack.options)"),
    "semisup": (SEMISUP, "semisup.method (options: semisup.options)"),
    "augmentations": (AUGMENTATIONS, "semisup.weak / semisup.strong (options: semisup.*_options)"),
    "engines": (ENGINES, "engine.name"),
}
"""``fedtail list KIND``: the registry and the config field that picks from it."""

_CITATION = re.compile(r"\(([^()]*\b(?:19|20)\d\d[^()]*)\)")
_SUMMARY_WIDTH = 110


@dataclass(frozen=True)
class Entry:
    """One plug-in as `fedtail list` shows it."""

    name: str
    summary: str
    paper: str
    options: str


def _doc(obj: object) -> str:
    """The docstring of the module that defines the plug-in (one file per plug-in: it names the method
    and its paper); the plug-in's own docstring where that module is a package's ``__init__`` (shared by
    several) or says nothing."""
    source = obj
    if not isinstance(obj, type) and not callable(obj) and hasattr(obj, "__dict__"):
        source = next((v for v in vars(obj).values() if callable(v)), obj)  # a spec: where its functions live
    module = inspect.getmodule(source)
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else None
    if own and own.startswith(f"{getattr(obj, '__name__', '')}("):
        own = None  # a dataclass's generated signature
    if module is not None and module.__doc__ and not hasattr(module, "__path__"):
        return inspect.cleandoc(module.__doc__)
    return inspect.cleandoc(own or (module.__doc__ if module is not None else "") or "")


def _first_sentence(text: str) -> str:
    """The docstring's first sentence on one line, without the citation in it (shown as the paper),
    shortened to fit a terminal line."""
    flat = " ".join(text.split())
    sentence, depth = flat, 0
    for i, ch in enumerate(flat):  # the first period before a capital outside parentheses ("eq. 5" goes on)
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "." and depth == 0 and re.match(r"\s[A-Z`]", flat[i + 1 : i + 3]):
            sentence = flat[:i]
            break
    sentence = _CITATION.sub("", sentence, count=1)
    sentence = re.sub(r"\s+([,:;])", r"\1", sentence).replace("  ", " ").rstrip(".:; ")
    return sentence if len(sentence) <= _SUMMARY_WIDTH else sentence[: _SUMMARY_WIDTH - 1].rstrip() + "…"


def paper_of(text: str) -> str:
    """The first citation-like parenthesis of a docstring (``Author et al., "Title", Venue Year``), or ''."""
    match = _CITATION.search(" ".join(text.split()))
    return match.group(1).strip() if match else ""


def entries(registry: Registry) -> list[Entry]:
    """Every plug-in of ``registry``, by name."""
    out = []
    for name in registry.names():
        doc = _doc(registry.get(name))
        out.append(Entry(name, _first_sentence(doc), paper_of(doc), describe_options(registry.options(name))))
    return out


def render(kinds: list[str]) -> str:
    """Plain text for ``fedtail list``: one block per kind, one entry per plug-in."""
    blocks = []
    for kind in kinds:
        registry, field = KINDS[kind]
        lines = [f"{kind} ({field})"]
        for e in entries(registry):
            lines.append(f"  {e.name:<18} {e.summary}")
            if e.paper:
                lines.append(f"  {'':<18} paper: {e.paper}")
            if e.options != "none":
                lines.append(f"  {'':<18} options: {e.options}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
