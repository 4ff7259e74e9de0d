"""What tracking records about a run, computed without importing MLflow.

The ``tracking`` config group (``conf/tracking/*.yaml``) as a typed
:class:`TrackingSettings`; the composed config flattened to dotted param keys
(``model.hidden_size``); the searched choices under short names (``cell``,
``hidden_size``, ``num_layers``, ``bidirectional``, ``forget_bias``,
``wrappers``, ``lr``) so single runs and sweep trials share the same columns in
the MLflow UI; a run label (``lstm-2x128-bi``) and the code version.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from rnnsearch.errors import ConfigError

# Top-level config keys that are not part of what one training run is: Hydra's own
# settings, the sweep definition (logged on the parent run) and tracking itself.
NOT_RUN_KEYS = ("hydra", "sweep", "tracking", "experiment")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow/utils/validation.py)


@dataclass(frozen=True)
class TrackingSettings:
    """``cfg.tracking``: see ``conf/tracking/mlflow.yaml`` for what each field means."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "rnnsearch"
    log_weights: bool = True
    log_model: bool = False
    log_curve: bool = True
    background: bool = True
    top_trials: int = 10
    sweep_experiment: Optional[str] = None  # null: a sweep logs to an experiment named after its study
    sweep_tags: Optional[dict[str, str]] = None  # extra tags of a sweep's parent run (set by experiments)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain, resolved Python containers (accepts a DictConfig or a mapping)."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(dict(cfg), default=str))  # a deep copy of plain data


def tracking_settings(cfg: Any) -> Optional[TrackingSettings]:
    """The tracking settings of a composed config, or None when tracking is off (or absent)."""
    section = to_dict(cfg).get("tracking") if cfg is not None else None
    if not section or not section.get("enabled", True):
        return None
    valid = {f.name for f in fields(TrackingSettings)}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ConfigError(f"tracking.{unknown[0]} is not a tracking setting; valid: {', '.join(sorted(valid))}.")
    settings = TrackingSettings(**section)
    if not isinstance(settings.uri, str) or not settings.uri:
        raise ConfigError(f"tracking.uri must be an MLflow tracking URI (e.g. sqlite:///mlflow.db), got {settings.uri!r}.")
    return settings


def format_value(value: Any) -> str:
    """A param value as one would type it in a Hydra override (``true``, ``null``, ``[...]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, separators=(",", ":"), default=str)
    else:
        text = str(value)
    if "://" in text:  # a storage or tracking URL: never show its password in the UI
        text = re.sub(r"(://[^:/@]+:)[^/@]*@", r"\1***@", text)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings → ``{"a.b.c": "value"}``; lists and empty mappings stay one JSON value."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = format_value(value)
    return out


def run_config(cfg: Any) -> dict[str, Any]:
    """The part of the composed config that defines one training run (no hydra/sweep/tracking)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in NOT_RUN_KEYS}


def wrapper_names(wrappers: Any) -> str:
    """``[{name: dropout, ...}, {name: residual}]`` → ``dropout+residual`` (``none`` when empty)."""
    names = [w.get("name", "?") if isinstance(w, Mapping) else str(w) for w in (wrappers or [])]
    return "+".join(names) or "none"


def choice_params(cfg: Mapping[str, Any], num_params: Optional[int] = None) -> dict[str, str]:
    """The architecture choices under short names, the same for single runs and sweep trials."""
    cell, model, optim = cfg.get("cell") or {}, cfg.get("model") or {}, cfg.get("optim") or {}
    out = {"cell": cell.get("name"), "hidden_size": model.get("hidden_size"), "num_layers": model.get("num_layers"),
           "bidirectional": model.get("bidirectional"), "wrappers": wrapper_names(model.get("wrappers")),
           "optimizer": optim.get("name"), "lr": optim.get("lr")}
    if "forget_bias" in cell:
        out["forget_bias"] = cell["forget_bias"]
    if num_params is not None:
        out["num_params"] = num_params
    return {k: format_value(v) for k, v in out.items()}


def run_label(cfg: Mapping[str, Any]) -> str:
    """A short name for the architecture: ``lstm-2x128-bi`` (cell, layers x hidden size, direction)."""
    cfg = to_dict(cfg)
    model = cfg.get("model") or {}
    label = f"{(cfg.get('cell') or {}).get('name', 'rnn')}-{model.get('num_layers', 1)}x{model.get('hidden_size', '?')}"
    return label + ("-bi" if model.get("bidirectional") else "")


@lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the rnnsearch source tree, when it is a git checkout (read once per process)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None
