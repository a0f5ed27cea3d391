"""Prefect flows over the plain `fedtail.pipeline` functions."""

from flows.pipeline import fl_pipeline

__all__ = ["fl_pipeline"]
