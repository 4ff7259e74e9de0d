"""Named experiments: ``python -m rnnsearch +experiment=NAME`` runs a set of related sweeps.

An experiment (``experiments/<name>/config.yaml``, linked as the Hydra option
``conf/experiment/<name>.yaml``) crosses *factors* — e.g. task × LSTM variant,
or cell × sequence length — into *arms*. Each arm is one Optuna study (named
``<experiment>-<setting>-<arm>``) whose trials are the ``sweep`` section with
the arm's overrides applied; all arms log to one MLflow experiment
(``<experiment>-<setting>``), so ``scripts/experiment_report.py`` can rebuild
the tables and plots from MLflow alone. ``experiment.setting`` picks a budget
(``small``: a CPU laptop; ``full``: GPU machines).

Modules: :mod:`.settings` (the ``experiment`` section, checked), :mod:`.run`
(the arms, one sweep each), :mod:`.results` (MLflow runs → per-arm tables and
parameter importances), :mod:`.plots` (the figures).
"""

from __future__ import annotations

from typing import Any, Optional, TextIO


def run_experiment(cfg: Any, stream: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Run every arm of ``cfg.experiment``; see :func:`rnnsearch.experiment.run.run_experiment`."""
    from .run import run_experiment as _run

    return _run(cfg, stream=stream)


__all__ = ["run_experiment"]
