"""Fine-tuning: train each task's data with no defence against forgetting.

The lower bound of class-incremental learning (e.g. Rebuffi et al., 2017, iCaRL, Sec. 4 "finetuning"):
the model is simply trained on the new task's classes, so earlier classes are catastrophically forgotten.
"""

from __future__ import annotations

from clients.continual import ContinualMethod
from fedtail.registry import CONTINUAL, PluginOptions


@CONTINUAL.register("finetune")
class Finetune(ContinualMethod):
    """All hooks are the base class's no-ops; registered so it can be chosen by name."""

    class Options(PluginOptions):
        """Fine-tuning has no settings: ``continual.options`` must be empty."""
