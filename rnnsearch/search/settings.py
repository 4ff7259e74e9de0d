"""``SweepSettings``: the ``sweep`` section of the config, checked once, with clear errors.

Every field is a key of ``conf/sweep/*.yaml`` and overridable from the command
line (``sweep.n_trials=50 sweep.workers=2 sweep.sampler=random ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from rnnsearch.errors import ConfigError, check_known_keys, check_positive_int, choice_error

SAMPLERS = ("tpe", "random", "gp", "cmaes", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


@dataclass
class SweepSettings:
    """The sweep's settings (see ``conf/sweep/default.yaml`` for each one's meaning)."""

    study_name: Optional[str] = None  # null: <sweep>-<task>, e.g. default-adding
    storage: Optional[str] = None  # null: ./<study_name>.journal; or an Optuna storage URL
    n_trials: int = 20  # the study's total of finished (complete + pruned) trials
    workers: Union[int, str] = 1  # N | auto
    sampler: str = "tpe"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    pruner: str = "median"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    objectives: Optional[list[str]] = None  # null: [best/val/<task metric>]
    directions: Optional[list[str]] = None  # null: inferred per objective
    max_params: Optional[int] = None
    max_failures: int = 5
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: int = 60
    grace_period: int = 120
    max_retry: int = 1
    top: int = 10
    best_config: Optional[str] = "best_{study}.yaml"
    progress: str = "auto"  # auto | live | plain | none

    @classmethod
    def from_config(cls, sweep: Any) -> "SweepSettings":
        """Build from ``cfg.sweep`` (a DictConfig or a mapping); unknown keys are an error."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(sweep):
            sweep = OmegaConf.to_container(sweep, resolve=True)
        sweep = dict(sweep or {})
        check_known_keys("sweep", sweep, (f.name for f in fields(cls)))
        for name in ("sampler_options", "pruner_options", "overrides", "params"):
            if sweep.get(name, {}) is None:
                sweep[name] = {}
        if sweep.get("enqueue", []) is None:
            sweep["enqueue"] = []
        s = cls(**sweep)
        s.check()
        return s

    def check(self) -> None:
        check_positive_int("sweep.n_trials", self.n_trials)
        check_positive_int("sweep.max_failures", self.max_failures)
        check_positive_int("sweep.top", self.top)
        if self.max_params is not None:
            check_positive_int("sweep.max_params", self.max_params)
        if not (self.workers == "auto" or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                           and self.workers >= 1)):
            raise ConfigError(f"sweep.workers must be a positive integer or 'auto', got {self.workers!r}.")
        if self.sampler not in SAMPLERS:
            raise choice_error("sweep.sampler", self.sampler, SAMPLERS)
        if self.pruner not in PRUNERS:
            raise choice_error("sweep.pruner", self.pruner, PRUNERS)
        if self.progress not in ("auto", "live", "plain", "none"):
            raise choice_error("sweep.progress", self.progress, ("auto", "live", "plain", "none"))
        for name in ("sampler_options", "pruner_options", "overrides", "params"):
            if not isinstance(getattr(self, name), Mapping):
                raise ConfigError(f"sweep.{name} must be a mapping, got {getattr(self, name)!r}.")
        if isinstance(self.objectives, str):
            self.objectives = [self.objectives]
        if isinstance(self.directions, str):
            self.directions = [self.directions]
        if self.objectives is not None and not self.objectives:
            raise ConfigError("sweep.objectives is empty; give at least one metric (or null for the task's metric).")
        if self.directions is not None:
            bad = [d for d in self.directions if d not in ("minimize", "maximize")]
            if bad:
                raise choice_error("sweep.directions entry", bad[0], ("minimize", "maximize"))
        if isinstance(self.enqueue, Mapping):
            self.enqueue = [dict(self.enqueue)]
        if not isinstance(self.enqueue, list) or not all(isinstance(e, Mapping) for e in self.enqueue):
            raise ConfigError(f"sweep.enqueue must be a list of compositions like [{{cell.name: lstm}}], "
                              f"got {self.enqueue!r}.")
        for name in ("heartbeat_interval", "grace_period"):
            check_positive_int(f"sweep.{name}", getattr(self, name))
        if not isinstance(self.max_retry, int) or self.max_retry < 0:
            raise ConfigError(f"sweep.max_retry must be an integer >= 0, got {self.max_retry!r}.")
