"""The search space: ``sweep.params`` in Hydra's sweep syntax → Optuna distributions.

``sweep.params`` mirrors the config tree, nested or dotted
(``model: {hidden_size: ...}`` or ``model.hidden_size: ...``); each leaf is the
space of one config key, written as for Hydra's sweepers and parsed by Hydra's
own override parser (:class:`~hydra.core.override_parser.overrides_parser.OverridesParser`):

* ``choice(a, b, c)`` (or ``a,b,c``) → categorical;
* ``range(start, stop[, step])`` → integers (or a float grid), half-open like
  Python's and Hydra's ``range`` (``range(1, 3)`` is 1 or 2);
* ``interval(low, high)`` → a float in ``[low, high]``; ``tag(log, ...)``
  samples on a log scale, ``tag(int, interval(...))`` samples integers;
* anything else is a fixed value, applied to every trial where it applies.

``{k}`` in a key stands for every layer index (``model.layers.{k}.hidden_size``),
expanded per trial for the layers that exist (see :mod:`rnnsearch.search.compose`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from rnnsearch.errors import ConfigError

LAYER_TEMPLATE = "{k}"
NO_WRAPPER = "none"  # the choice that leaves a wrapper slot empty (Hydra's choice() cannot hold null)


@dataclass(frozen=True)
class Param:
    """One entry of the search space: a dotted config key and its distribution, or a fixed value."""

    key: str  # dotted config key; may contain {k}
    dist: Optional[BaseDistribution]  # None: a fixed value
    value: Any = None  # the fixed value (when dist is None)
    text: str = ""  # what the user wrote (for messages)

    @property
    def fixed(self) -> bool:
        return self.dist is None


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"model": {"hidden_size": x}, "cell.name": y}`` → ``[("model.hidden_size", x), ("cell.name", y)]``.

    Lists are entered by index (``model.wrappers.0.name``); empty containers are leaves.
    A key given twice (nested and dotted) keeps its last value.
    """
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping) and tree:
        items: Sequence[tuple[Any, Any]] = list(tree.items())
    elif isinstance(tree, list) and tree:
        items = list(enumerate(tree))
    else:
        return [(prefix, tree)] if prefix else []
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        for kk, vv in flatten(v, key):
            out.pop(kk, None)
            out[kk] = vv
    return list(out.items())


_parser = None


def _parse(key: str, text: str) -> Any:
    """The override ``key=text`` parsed by Hydra (a sweep object or a plain value)."""
    global _parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if _parser is None:
        _parser = OverridesParser.create()
    try:
        return _parser.parse_override(f"x={text}")
    except Exception as exc:  # Hydra's grammar errors: one line, with the key
        msg = str(exc).strip().splitlines()[0]
        raise ConfigError(f"sweep.params.{key}: cannot parse {text!r} ({msg}). Use choice(...), range(...), "
                          f"interval(...), tag(log, interval(...)) or a plain value.") from None


def parse_param(key: str, raw: Any) -> Param:
    """The :class:`Param` for one ``sweep.params`` leaf (``raw`` is the YAML value)."""
    if not isinstance(raw, str):
        return Param(key, None, raw, repr(raw))
    override = _parse(key, raw)
    if not override.is_sweep_override():
        return Param(key, None, override.value(), raw)
    sweep = override.value()
    tags = set(getattr(sweep, "tags", ()) or ())
    unknown = tags - {"log", "int"}
    if unknown:
        raise ConfigError(f"sweep.params.{key}: unknown tag(s) {sorted(unknown)} in {raw!r}; valid tags: log, int.")
    log = "log" in tags
    if override.is_choice_sweep() or (override.is_range_sweep() and sweep.shuffle):
        choices = list(override.sweep_iterator())
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"sweep.params.{key}: choice values must be numbers, strings or booleans, got {bad[0]!r} "
                              f"in {raw!r}. Search list-valued keys element by element (e.g. model.wrappers.0.name).")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"sweep.params.{key}: {raw!r} lists a value twice.")
        return Param(key, CategoricalDistribution(choices), None, raw)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"sweep.params.{key}: {raw!r} is empty (range's stop is exclusive, like Python's).")
        step = sweep.step
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, step)):
            if log and step != 1:
                raise ConfigError(f"sweep.params.{key}: tag(log, range(...)) needs step 1, got {raw!r}.")
            return Param(key, IntDistribution(values[0], values[-1], step=1 if log else step, log=log), None, raw)
        if log:
            raise ConfigError(f"sweep.params.{key}: a float range has a step and cannot be log-scaled; "
                              f"use tag(log, interval(low, high)) instead of {raw!r}.")
        high = round(sweep.start + step * (len(values) - 1), 12)
        return Param(key, FloatDistribution(float(sweep.start), high, step=float(step)), None, raw)
    if override.is_interval_sweep():
        low, high = sweep.start, sweep.end
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ConfigError(f"sweep.params.{key}: {raw!r} needs finite low <= high.")
        if log and low <= 0:
            raise ConfigError(f"sweep.params.{key}: {raw!r} is log-scaled, so its low end must be > 0.")
        if "int" in tags:
            if low != int(low) or high != int(high):
                raise ConfigError(f"sweep.params.{key}: tag(int, ...) needs whole-number ends, got {raw!r}.")
            return Param(key, IntDistribution(int(low), int(high), log=log), None, raw)
        return Param(key, FloatDistribution(low, high, log=log), None, raw)
    raise ConfigError(f"sweep.params.{key}: {raw!r} is a sweep Optuna cannot sample (use choice, range or interval).")


def parse_space(params: Any, groups: Sequence[str] = ()) -> list[Param]:
    """All of ``sweep.params`` (a nested mapping) as :class:`Param` s, in the order written.

    A leaf at a config group's own key (``cell: choice(rnn, gru)``, as Hydra's
    sweeper writes it) means that group's ``name`` (``cell.name``).
    """
    if params is None:
        return []
    if not isinstance(params, Mapping):
        raise ConfigError(f"sweep.params must map config keys to search spaces, e.g. "
                          f"{{model.hidden_size: 'choice(32, 64)'}}; got {params!r}.")
    out = []
    for key, raw in flatten(params):
        if key in groups:
            key = f"{key}.name"
        out.append(parse_param(key, raw))
    return out


def grid_values(dist: BaseDistribution, key: str) -> list[Any]:
    """Every value of a discrete distribution (for the grid sampler)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step))
        return [round(dist.low + i * dist.step, 12) for i in range(n + 1)]
    raise ConfigError(f"sampler=grid needs a finite set of values, but sweep.params.{key} is continuous; "
                      f"use choice(...) or range(...), or another sampler (tpe, random, ...).")


def describe(dist: Optional[BaseDistribution], value: Any = None) -> str:
    """Short human description of a distribution (for the sweep's header)."""
    if dist is None:
        return f"= {value!r}"
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    scale = " log" if getattr(dist, "log", False) else ""
    step = f" step {dist.step}" if getattr(dist, "step", None) not in (None, 1) else ""
    return f"[{dist.low}, {dist.high}]{step}{scale}"
