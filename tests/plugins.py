"""Every registered plug-in with options, each as a smoke config it accepts at its default options.

Tests that make a promise for "every plug-in as shipped" (one canonical config, resume) iterate over
`plugin_cases`, read from the registries: a new plug-in is covered without editing a test. A plug-in is
tried in the smoke config first, then in the few settings some plug-ins require (LDAM's cosine head, a
binary problem for the threshold adjustment, an unlabeled part for
the semi-supervised methods); one that fits none fails `test_every_plugin_has_a_case`,
which says what to add here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtail.config import _OPTIONS_OF, ConfigError, apply_overrides, build_config, read_config_file

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"

SETTINGS: tuple[dict[str, Any], ...] = (
    {},
    {"model.classifier": "cosine"},
    {"dataset.classes": [3, 8], "tasks.classes_per_task": None},
    {"partition.labeled_fraction": 0.5},
)
"""What a plug-in may need besides the smoke config, tried in this order."""


@dataclass(frozen=True)
class Case:
    """One plug-in (``section``'s ``name``) and the overrides onto configs/smoke.yaml that run it."""

    section: str
    name: str
    overrides: dict[str, Any] = field(hash=False)

    @property
    def id(self) -> str:
        return f"{self.section}-{self.name}"


def _accepted(overrides: dict[str, Any]) -> str | None:
    try:
        build_config(apply_overrides(read_config_file(SMOKE), overrides), schedule=False)
    except ConfigError as err:
        return str(err)
    return None


def plugin_cases() -> tuple[list[Case], list[str]]:
    """A `Case` for each plug-in of each registry whose config section has options, and the plug-ins no
    setting in `SETTINGS` accepts (with the last reason)."""
    cases, refused = [], []
    for section, (registry, name_field) in _OPTIONS_OF.items():
        for name in registry.names():
            problem = ""
            for setting in SETTINGS:
                overrides = {f"{section}.{name_field}": name, **setting}
                problem = _accepted(overrides)
                if problem is None:
                    cases.append(Case(section, name, overrides))
                    break
            else:
                refused.append(f"{section} {name!r}: {problem}")
    return cases, refused


CASES, REFUSED = plugin_cases()
