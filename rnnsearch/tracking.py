"""Experiment tracking hooks (MLflow). INTERIM: the interface only; the MLflow implementation is in progress.

Interface used by the CLI and the sweep (keep these signatures):

* ``tracking_callbacks(cfg, *, parent_run_id=None, run_name=None, tags=None, params=None) -> list[Callback]``:
  callbacks that record one training run (a single run, or one sweep trial as a
  child of ``parent_run_id``). ``params`` are the short, readable searched
  choices; ``tags`` extra tags (study, trial number, ...). The run's final
  status follows how training ended (``on_train_end`` / ``on_train_abort``).
* ``start_sweep_run(cfg, study_name) -> str | None``: the parent run of a sweep
  (reused when the same study is resumed); None when tracking is off.
* ``finish_sweep_run(cfg, parent_run_id, study) -> None``: logs the sweep's
  summary (Optuna plots, top-trials table) on the parent run and ends it.
"""

from __future__ import annotations

from typing import Any, Optional

from rnnsearch.callbacks import Callback


def tracking_callbacks(cfg: Any, *, parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                       tags: Optional[dict[str, str]] = None, params: Optional[dict[str, Any]] = None) -> list[Callback]:
    """Callbacks that record a run (none yet)."""
    return []


def start_sweep_run(cfg: Any, study_name: str) -> Optional[str]:
    """Parent run id of the sweep (None: tracking off)."""
    return None


def finish_sweep_run(cfg: Any, parent_run_id: Optional[str], study: Any) -> None:
    """Log the sweep summary on the parent run and end it."""
    return None
