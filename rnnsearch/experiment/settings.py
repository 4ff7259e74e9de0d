"""``ExperimentSettings``: the ``experiment`` section of the config, checked once, with clear errors."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from rnnsearch.errors import ConfigError, check_known_keys, choice_error

_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Arm:
    """One combination of factor levels: its name (``digits-NFG``), levels and config overrides."""

    name: str
    levels: dict[str, str]
    overrides: dict[str, Any]


@dataclass
class ExperimentSettings:
    """``cfg.experiment`` (see ``experiments/*/config.yaml`` for each field in use)."""

    name: str = ""
    title: str = ""
    setting: str = "small"
    budgets: dict[str, Any] = field(default_factory=dict)  # setting name -> values the config interpolates
    factors: dict[str, Any] = field(default_factory=dict)  # factor -> level -> config overrides
    only: Optional[list[str]] = None  # run only these arms (names or levels); null: all
    report: dict[str, Any] = field(default_factory=dict)  # what scripts/experiment_report.py draws

    @classmethod
    def from_config(cls, section: Any) -> "ExperimentSettings":
        """Build from the raw ``experiment`` mapping (not resolved: ``setting`` is checked before interpolation)."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(section):
            section = OmegaConf.to_container(section, resolve=False)
        section = dict(section or {})
        check_known_keys("experiment", section, (f.name for f in fields(cls)))
        if isinstance(section.get("only"), str):
            section["only"] = [section["only"]]
        s = cls(**{k: v for k, v in section.items() if v is not None or k == "only"})
        s.check()
        return s

    def check(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"experiment.name must be letters, digits, '_' or '.', got {self.name!r}.")
        if not isinstance(self.budgets, Mapping) or not self.budgets:
            raise ConfigError(f"experiment.budgets must map setting names (small, full) to budgets; "
                              f"got {self.budgets!r}.")
        if self.setting not in self.budgets:
            raise choice_error("experiment.setting", self.setting, self.budgets)
        if not isinstance(self.factors, Mapping) or not self.factors:
            raise ConfigError("experiment.factors must map each factor to its levels, e.g. "
                              "{cell: {lstm: {cell: {name: lstm}}, gru: {cell: {name: gru}}}}; got "
                              f"{self.factors!r}.")
        for factor, levels in self.factors.items():
            if not isinstance(levels, Mapping) or not levels:
                raise ConfigError(f"experiment.factors.{factor} must map level names to config overrides, "
                                  f"got {levels!r}.")
            for level, overrides in levels.items():
                if not _NAME.match(str(level)):
                    raise ConfigError(f"experiment.factors.{factor} level {level!r}: use letters, digits, '_' "
                                      f"or '.' (it becomes part of a study name).")
                if not isinstance(overrides, Mapping):
                    raise ConfigError(f"experiment.factors.{factor}.{level} must be a mapping of config "
                                      f"overrides like {{task: {{seq_len: 100}}}}, got {overrides!r}.")
        if self.only is not None:
            valid = {a.name for a in self.all_arms()} | {str(v) for lv in self.factors.values() for v in lv}
            bad = [o for o in self.only if str(o) not in valid]
            if bad:
                raise choice_error("experiment.only entry", bad[0], valid,
                                   "Give arm names (levels joined by '-') or single levels.")

    def all_arms(self) -> list[Arm]:
        """Every combination of levels, in the order written (the first factor varies slowest)."""
        names = list(self.factors)
        arms = []
        for combo in itertools.product(*(list(self.factors[f].items()) for f in names)):
            overrides: dict[str, Any] = {}
            for _, level_overrides in combo:
                overrides = deep_merge(overrides, level_overrides)
            levels = {f: str(level) for f, (level, _) in zip(names, combo)}
            arms.append(Arm("-".join(levels.values()), levels, overrides))
        return arms

    def arms(self) -> list[Arm]:
        """The arms to run: all, or those ``only`` selects; an entry is an arm name or a level, and an arm runs
        when any entry names it or one of its levels (``only=[digits, NFG]``: every digits arm and every NFG arm)."""
        arms = self.all_arms()
        if self.only is None:
            return arms
        wanted = {str(o) for o in self.only}
        return [a for a in arms if a.name in wanted or wanted & set(a.levels.values())]

    @property
    def mlflow_experiment(self) -> str:
        """The MLflow experiment every arm logs to: ``<name>-<setting>``."""
        return f"{self.name}-{self.setting}"

    def study_name(self, arm: Arm) -> str:
        return f"{self.name}-{self.setting}-{arm.name}"


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in (nested mappings merged, everything else replaced)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
