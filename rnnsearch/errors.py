"""Errors rnnsearch raises for bad input.

Every configuration problem is a :class:`ConfigError`: one paragraph that names
the bad value and the valid choices. The CLI prints it without a traceback and
exits with status 2, before any training starts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


def choice_error(what: str, value: object, choices: Iterable[object], hint: str = "") -> ConfigError:
    """Build the standard "unknown X 'v'; valid choices: a, b, c" error."""
    valid = ", ".join(sorted(str(c) for c in choices)) or "(none)"
    msg = f"Unknown {what} {value!r}; valid choices: {valid}."
    if hint:
        msg += f" {hint}"
    return ConfigError(msg)


def config_composition_message(exc: BaseException) -> str:
    """One paragraph from a Hydra composition error (e.g. ``cell=foo``: an unknown config-group option)."""
    missing, options = getattr(exc, "missing_cfg_file", None), getattr(exc, "options", None)
    if missing and options:
        group, _, name = str(missing).rpartition("/")
        return str(choice_error(group or "config", name, options,
                                hint=f"(the files in conf/{group}/ and on hydra.searchpath)"))
    parts = [str(exc)] + ([str(exc.__cause__)] if exc.__cause__ is not None else [])
    override = getattr(exc, "override", None)  # a parse error: say which argument
    if override and override not in parts[0]:
        parts.insert(0, f"Cannot parse the override {override!r}:")
    return " ".join(line.strip() for part in parts for line in part.splitlines() if line.strip())


def check_positive_int(what: str, value: object) -> int:
    """Return ``value`` as an int if it is a positive integer (numpy's too), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}.")
    return int(value)


def check_keep_prob(what: str, value: object) -> float:
    """Return ``value`` as a float if it lies in (0, 1], else raise ConfigError."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in (0, 1], got {value!r}.") from None
    if not (0.0 < v <= 1.0):
        raise ConfigError(f"{what} must be in (0, 1] (a keep probability, 1 = no dropout), got {value!r}.")
    return v


def check_known_keys(what: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Reject keys of a config section that are not among ``valid`` (``what``: e.g. "sweep")."""
    valid = list(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown {what} setting(s) {unknown}; valid settings: {', '.join(valid)}.")


def check_bool(what: str, value: object) -> bool:
    """Return ``value`` if it is a boolean (YAML true/false, numpy's too), else raise ConfigError (no truthy strings)."""
    if not isinstance(value, bool) and str(getattr(value, "dtype", "")) != "bool":
        raise ConfigError(f"{what} must be true or false, got {value!r}.")
    return bool(value)


def check_positive_number(what: str, value: object, hint: str = "") -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{what} must be a positive number{hint}, got {value!r}.")
    return float(value)


def check_number(what: str, value: object, hint: str = "") -> float:
    """Return ``value`` as a float if it is a finite number, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number{hint}, got {value!r}.")
    return float(value)
