"""All labels: each client trains on its labeled and unlabeled parts with their true labels. The upper
bound of the semi-supervised table: what the same federation reaches if every sample were labeled (the
upper end of the gap a semi-supervised method closes)."""

from __future__ import annotations

from typing import ClassVar

from clients.semisup import SemiSupervised
from fedtail.registry import SEMISUP


@SEMISUP.register("all_labels")
class AllLabels(SemiSupervised):
    """Every sample labeled: clients load their unlabeled part with its true labels, the server counts
    them in the class prior, FedAvg weights count them."""

    views: ClassVar[tuple[str, ...]] = ()
    reveals_labels: ClassVar[bool] = True
