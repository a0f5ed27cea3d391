"""Supervised-only: each client trains on its labeled part alone; the unlabeled part is left out. The
baseline every semi-supervised method is measured against (the lower end of the gap it closes)."""

from __future__ import annotations

from typing import ClassVar

from clients.semisup import SemiSupervised
from fedtail.registry import SEMISUP


@SEMISUP.register("none")
class SupervisedOnly(SemiSupervised):
    """The labeled samples only (no unlabeled stream, no extra forward pass)."""

    uses_unlabeled: ClassVar[bool] = False
    views: ClassVar[tuple[str, ...]] = ()
