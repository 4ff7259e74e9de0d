"""Architecture sweeps with Optuna: ``python -m rnnsearch +sweep``.

``run_sweep(cfg)`` runs the sweep that ``cfg.sweep`` describes (see
``conf/sweep/default.yaml`` and ``docs/sweeps.md``). The modules, one job each:
:mod:`.settings` (the ``sweep`` section), :mod:`.space` (Hydra sweep syntax →
Optuna distributions), :mod:`.conditions` and :mod:`.compose` (the conditional
trial config), :mod:`.study` (storage, sampler, pruner), :mod:`.objective` (one
trial), :mod:`.workers` (processes pulling trials), :mod:`.progress` (the live
display), :mod:`.report` (the closing table and best config), :mod:`.run` (ties
them together). Importing this package is cheap; Optuna loads on first use.
"""

from __future__ import annotations

from typing import Any, Optional, TextIO

from .errors import SweepFailed


def run_sweep(cfg: Any, stream: Optional[TextIO] = None, **kwargs: Any) -> dict[str, Any]:
    """Run the sweep ``cfg.sweep`` describes on the composition ``cfg``; see :func:`rnnsearch.search.run.run_sweep`."""
    from .run import run_sweep as _run_sweep

    return _run_sweep(cfg, stream=stream, **kwargs)


__all__ = ["run_sweep", "SweepFailed"]
