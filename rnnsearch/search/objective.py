"""One trial: compose its config, check its size, train it, and record how it ended.

:class:`TrialObjective` is what ``study.optimize`` calls. A trial's outcome is
kept on the trial as user attributes (``params`` count, ``epochs`` trained,
``reason`` for a pruned or failed trial, ``worker``), so the report and the
benchmark read them back from any storage:

* trained to the end → COMPLETE with the objective values;
* pruned by the pruner → PRUNED (the epoch is in ``reason``);
* over ``sweep.max_params`` → PRUNED before training (``reason``), so samplers
  such as TPE learn to avoid the region (they ignore FAIL trials);
* non-finite loss (:class:`~rnnsearch.callbacks.TrainingDiverged`) → PRUNED
  with ``reason = "diverged: ..."`` for the same reason;
* any other exception → FAIL with ``reason`` (the study goes on; see
  ``sweep.max_failures`` in :mod:`rnnsearch.search.workers`).

Pruning goes through :class:`OptunaPruning`, a training-loop callback: the
loop itself never imports Optuna.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from rnnsearch.callbacks import Callback, TrainingDiverged
from rnnsearch.errors import ConfigError

from .compose import Composition, GroupOptions, compose_trial
from .space import Param


class OptunaPruning(Callback):
    """Reports ``val/<metric>`` to the trial each epoch and raises ``TrialPruned`` when the pruner says so."""

    def __init__(self, trial: optuna.Trial, key: str, enabled: bool = True) -> None:
        self.trial = trial
        self.key = key
        self.enabled = enabled
        self.epochs = 0

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs = epoch
        value = metrics.get(self.key)
        if not self.enabled or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {self.key} = {value:.4g}")


def pruning_key(objective: str) -> Optional[str]:
    """The per-epoch metric a pruner can watch for ``objective``, in its direction, or None.

    ``best/val/x`` and ``val/x`` → ``val/x``; ``train/loss`` → itself. Anything else (``params``,
    ``test/...``, speed) has no per-epoch value that tracks it: such a sweep does not prune, since pruning
    on another metric would judge that metric in the objective's direction (e.g. stop the most accurate
    trials of a sweep that minimises ``val/loss``).
    """
    key = objective[len("best/"):] if objective.startswith("best/") else objective
    return key if key.startswith("val/") or key == "train/loss" else None


def suggest_with(trial: optuna.Trial) -> Any:
    """``(key, distribution) -> value`` through the trial's public ``suggest_*`` methods."""

    def suggest(key: str, dist: BaseDistribution) -> Any:
        if isinstance(dist, CategoricalDistribution):
            return trial.suggest_categorical(key, dist.choices)
        if isinstance(dist, IntDistribution):
            return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        if isinstance(dist, FloatDistribution):
            return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        raise TypeError(f"unsupported distribution {dist!r}")

    return suggest


def run_name(number: int, cfg: dict[str, Any]) -> str:
    """``t017-lstm-2x128-bi``: trial number, cell, layers x hidden size, direction."""
    model = cfg.get("model", {})
    cell = cfg.get("cell", {}).get("name", "cell")
    bi = "-bi" if model.get("bidirectional") else ""
    return f"t{number:03d}-{cell}-{model.get('num_layers', 1)}x{model.get('hidden_size', '?')}{bi}"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


#: The trial user attribute holding the config the trial trained (plain containers).
CONFIG_ATTR = "config"


@dataclass
class TrialObjective:
    """Everything one trial needs; picklable, so worker processes get their own copy."""

    base: dict[str, Any]  # the composed config without `sweep` / `hydra`
    space: list[Param]
    fixed: list[Param]  # sweep.overrides
    groups: GroupOptions
    objectives: list[str]
    prune_key: str  # the per-epoch metric reported to the pruner (pruning_key of the objective)
    prune: bool = True
    max_params: Optional[int] = None
    study_name: str = ""
    parent_run_id: Optional[str] = None
    skip_duplicates: bool = False  # grid: a point that differs from an earlier one only in keys that do not apply
    on_start: Any = field(default=None, repr=False, compare=False)  # called once the trial exists (claim release)

    def compose(self, trial: optuna.Trial) -> Composition:
        return compose_trial(self.base, self.space, suggest_with(trial), self.groups, self.fixed)

    def __call__(self, trial: optuna.Trial) -> float | Sequence[float]:
        trial.set_user_attr("worker", worker_id())
        if self.on_start is not None:
            self.on_start()
        start = time.perf_counter()
        pruning = OptunaPruning(trial, self.prune_key, enabled=self.prune)
        try:
            comp = self.compose(trial)
            cfg = comp.cfg
            trial.set_user_attr("run_name", run_name(trial.number, cfg))
            # what it trains, as JSON (numpy numbers from the Python API too): the best config is written from it
            trial.set_user_attr(CONFIG_ATTR, as_json(cfg))
            earlier = same_composition(trial, comp.params) if self.skip_duplicates else None
            if earlier is not None:
                raise _Rejected(f"duplicate of trial {earlier} (this grid point differs from it only in keys "
                                f"that do not apply to it)")
            if self.max_params is not None:
                n = count_params(cfg)
                trial.set_user_attr("params", n)
                if n > self.max_params:
                    raise _Rejected(f"{n:,} parameters > sweep.max_params={self.max_params:,}")
            callbacks = [*self._tracking(trial, cfg, comp.params), pruning]
            from rnnsearch.train import train

            result = train(cfg, callbacks=callbacks)
        except _Rejected as exc:
            trial.set_user_attr("reason", f"rejected: {exc}")
            trial.set_user_attr("epochs", 0)
            raise optuna.TrialPruned(str(exc)) from None
        except optuna.TrialPruned as exc:
            self._ended(trial, pruning, start, str(exc))
            raise
        except TrainingDiverged as exc:
            self._ended(trial, pruning, start, f"diverged: {exc}")
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        except KeyboardInterrupt:
            self._ended(trial, pruning, start, "interrupted")
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as exc:
            self._ended(trial, pruning, start, f"{type(exc).__name__}: {exc}")
            raise
        trial.set_user_attr("params", int(result["params"]))
        trial.set_user_attr("epochs", int(result["epochs"]))
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        trial.set_user_attr("metrics", {k: v for k, v in result.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v)})
        missing = [k for k in self.objectives if k not in result]
        if missing:
            available = sorted(k for k, v in result.items() if isinstance(v, (int, float)))
            error = ConfigError(f"sweep objective(s) {missing} are not metrics train() returns; "
                                f"available: {', '.join(available)}.")
            self._ended(trial, pruning, start, str(error))  # the failure's reason, in the table and the study
            raise error
        values = [float(result[k]) for k in self.objectives]
        return values[0] if len(values) == 1 else values

    def _ended(self, trial: optuna.Trial, pruning: OptunaPruning, start: float, reason: str) -> None:
        trial.set_user_attr("reason", reason[:500])
        trial.set_user_attr("epochs", pruning.epochs)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))

    def _tracking(self, trial: optuna.Trial, cfg: dict[str, Any], params: dict[str, Any]) -> list[Callback]:
        from omegaconf import OmegaConf

        from rnnsearch.tracking import tracking_callbacks

        return list(tracking_callbacks(OmegaConf.create(cfg), parent_run_id=self.parent_run_id,
                                       run_name=run_name(trial.number, cfg),
                                       tags={"study": self.study_name, "trial": str(trial.number)},
                                       params=dict(params)))


def json_default(obj: Any) -> Any:
    """JSON for what ``json`` cannot write itself: numpy/torch scalars as numbers, anything else as text."""
    item = getattr(obj, "item", None)
    return item() if callable(item) else str(obj)


def as_json(value: Any) -> Any:
    """``value`` as a JSON storage gives it back (tuples as lists, int keys as strings, numpy numbers as numbers)."""
    return json.loads(json.dumps(value, default=json_default))


class _Rejected(Exception):
    """The composition is not trained: over the parameter budget, or a duplicate."""


def same_composition(trial: optuna.Trial, params: dict[str, Any]) -> Optional[int]:
    """The number of an earlier trial (running, complete or pruned) that sampled exactly ``params``, if any."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number < trial.number and t.params == params:
            return t.number
    return None


def count_params(cfg: dict[str, Any]) -> int:
    """Trainable parameters of the model ``cfg`` describes, built on the CPU without training."""
    from rnnsearch.model import build_model, count_parameters
    from rnnsearch.tasks import create_task

    task = create_task(cfg["task"])
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step,
                        token_input=task.token_input)
    return count_parameters(model)
