"""Experiment tracking hooks (MLflow); placeholder until tracking is configured."""

from __future__ import annotations

from typing import Any

from rnnsearch.callbacks import Callback


def tracking_callbacks(cfg: Any) -> list[Callback]:
    """Callbacks that record a run; none until a ``tracking`` config is composed."""
    return []
