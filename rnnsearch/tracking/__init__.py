"""Experiment tracking in MLflow: every training run and every sweep trial a comparable MLflow run.

The CLI and the sweep call three functions (the whole interface):

* :func:`tracking_callbacks` — callbacks that record one training run: a single
  run, or one trial as a child of the sweep's parent run. ``params`` are the
  searched choices under short names, ``tags`` extra tags (``study``,
  ``trial``). The run's status follows how training ended: FINISHED (tag
  ``trial_state=COMPLETE``), KILLED for ``optuna.TrialPruned`` and for a trial
  whose loss diverged (PRUNED, as the sweep counts it), FAILED for any other
  exception (FAIL, with ``failure_reason``). Put them *before* a pruning
  callback so the pruned epoch's metrics are logged too.
* :func:`start_sweep_run` — the study's parent run (reused when the study resumes).
* :func:`finish_sweep_run` — Optuna plots and the top-trials table on the parent; ends it.

Settings come from the ``tracking`` config group (``conf/tracking/mlflow.yaml``;
``tracking=none`` turns tracking off, and then ``mlflow`` is never imported).
The default store is MLflow's own default, ``sqlite:///mlflow.db`` in the
working directory: run ``mlflow ui`` there (docs/tracking.md). Each MLflow call
runs on a background thread (:mod:`.worker`), so training does not wait on it.
"""

from __future__ import annotations

from typing import Any, Optional

from rnnsearch.callbacks import Callback
from rnnsearch.tracking.settings import TrackingSettings, run_label, tracking_settings
from rnnsearch.tracking.worker import flush

__all__ = ["tracking_callbacks", "start_sweep_run", "finish_sweep_run", "flush", "run_label", "tracking_settings",
           "TrackingSettings"]


def tracking_callbacks(cfg: Any, *, parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                       tags: Optional[dict[str, Any]] = None, params: Optional[dict[str, Any]] = None) -> list[Callback]:
    """Callbacks that record one training run in MLflow (``[]`` when tracking is off).

    Args:
        cfg: the composed config (DictConfig or dict) of this run, with its ``tracking`` section.
        parent_run_id: the sweep's parent run (from :func:`start_sweep_run`); None for a single run.
        run_name: e.g. ``t017-lstm-2x128-bi``; default :func:`run_label` (``lstm-2x128-bi``).
        tags: extra run tags, e.g. ``{"study": name, "trial": 17}``.
        params: the searched choices under short names, e.g. ``{"cell": "lstm", "lr": 3e-3}``.
    """
    settings = tracking_settings(cfg)
    if settings is None:
        return []
    from rnnsearch.tracking.run import MlflowRun

    return [MlflowRun(settings, cfg, parent_run_id=parent_run_id, run_name=run_name, tags=tags, params=params)]


def start_sweep_run(cfg: Any, study_name: str, study_id: Optional[str] = None,
                    adopt_untagged: bool = False) -> Optional[str]:
    """The parent run id of the sweep ``study_name`` (found by its tags when the study resumes); None: tracking off.

    The experiment is named after the study. Raises if the tracking store cannot be reached,
    so that a misconfigured ``tracking.uri`` stops a sweep before its first trial.
    """
    settings = tracking_settings(cfg)
    if settings is None:
        return None
    from rnnsearch.tracking.sweep import start_parent

    try:
        return start_parent(settings, cfg, study_name, study_id, adopt_untagged)
    except Exception as exc:
        from rnnsearch.errors import ConfigError

        raise ConfigError(f"MLflow tracking at tracking.uri={settings.uri!r} failed: {type(exc).__name__}: {exc} "
                          "(set tracking.uri, or tracking=none to run without tracking)") from exc


def finish_sweep_run(cfg: Any, parent_run_id: Optional[str], study: Any, status: str = "FINISHED") -> None:
    """Wait for the trials' logging, log the study summary on the parent run and end it with ``status``."""
    settings = tracking_settings(cfg)
    if settings is None or parent_run_id is None:
        return
    flush()
    from rnnsearch.tracking.sweep import finish_parent

    finish_parent(settings, parent_run_id, study, status)
