"""``run_experiment(cfg)``: every arm of an experiment, one sweep (Optuna study) each.

The arm's overrides (its factor levels) are merged into ``sweep.overrides``, so
a key the user sets on the command line still wins, as in any sweep. Each arm's
study is stored in ``sweep.storage`` (by default one journal file per
experiment and setting) under ``<experiment>-<setting>-<arm>``; rerunning the
command resumes every arm where it stopped. With tracking on, all arms log to
the MLflow experiment ``<experiment>-<setting>``, and each arm's parent run is
tagged with the experiment, setting, arm and levels (``level.<factor>``), which
is what :mod:`.results` reads back.
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Any, Optional, TextIO

from omegaconf import OmegaConf

from rnnsearch.errors import ConfigError
from rnnsearch.search.errors import SweepFailed
from rnnsearch.search.space import flatten

from .settings import Arm, ExperimentSettings, deep_merge


def _cli_overrides() -> list[str]:
    """The user's command-line overrides (under ``@hydra.main``), minus the experiment's own keys."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # not under @hydra.main (tests, the Python API)
        return []
    return [o for o in task if not o.lstrip("+~").startswith("experiment")]


def _resolve(cfg: Any) -> dict[str, Any]:
    if not OmegaConf.is_config(cfg):
        return copy.deepcopy(dict(cfg))
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as exc:  # an interpolation into experiment.budgets that does not exist
        raise ConfigError(f"The experiment config does not resolve: {exc}. Each budget in experiment.budgets "
                          f"must define every key the config interpolates.") from None


def arm_config(container: dict[str, Any], settings: ExperimentSettings, arm: Arm) -> dict[str, Any]:
    """The config of one arm's sweep: the experiment's config with the arm's overrides and study name."""
    cfg = copy.deepcopy({k: v for k, v in container.items() if k != "experiment"})
    sweep = dict(cfg.get("sweep") or {})
    sweep["overrides"] = deep_merge(sweep.get("overrides") or {}, arm.overrides)
    sweep["study_name"] = settings.study_name(arm)
    cfg["sweep"] = sweep
    tracking = cfg.get("tracking")
    if isinstance(tracking, dict) and tracking.get("enabled", True):
        tracking["sweep_experiment"] = settings.mlflow_experiment
        tracking["sweep_tags"] = {"experiment": settings.name, "setting": settings.setting, "arm": arm.name,
                                  **{f"level.{f}": v for f, v in arm.levels.items()}}
    return cfg


#: Command-line keys that change how an experiment runs, not what its trials compute.
NEUTRAL_KEYS = ("sweep.workers", "sweep.n_trials", "sweep.progress", "sweep.storage", "sweep.top", "tracking",
                "device", "hydra")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _override_notes(cli: list[str], settings: ExperimentSettings) -> list[str]:
    """Warnings for command-line keys that cancel a factor's levels or change what the trials compute."""
    notes = []
    factor_keys: dict[str, str] = {}
    for factor, levels in settings.factors.items():
        for overrides in levels.values():
            for k, _ in flatten(overrides):
                factor_keys.setdefault(k, factor)
    for o in cli:
        k = _key(o)
        hit = next((f for fk, f in factor_keys.items() if fk == k or fk.startswith(k + ".") or k.startswith(fk + ".")),
                   None)
        if hit:
            notes.append(f"your {o} overrides what factor {hit!r} sets per arm: every arm uses your value, so "
                         f"the arms no longer differ in {hit}.")
        elif not k.startswith(NEUTRAL_KEYS):
            notes.append(f"your {o} changes the trials of {settings.mlflow_experiment}: they resume (and are "
                         f"reported with) any earlier trials of its studies in {settings.name}-{settings.setting}"
                         f".journal and MLflow; run in another folder to keep them apart.")
    return notes


def _check_tasks(container: dict[str, Any], arms: list[Arm]) -> None:
    """Every arm's task can run here (e.g. chorales needs music21): fail before the first trial, not per trial."""
    from rnnsearch.tasks import TASKS

    base = ((container.get("sweep") or {}).get("overrides") or {}).get("task", {}).get("name") \
        or (container.get("task") or {}).get("name")
    for arm in arms:
        name = (arm.overrides.get("task") or {}).get("name") or base
        if name:
            try:
                TASKS.get(name).check_available()
            except ConfigError as exc:
                raise ConfigError(f"arm {arm.name}: {exc} Or leave its arms out, e.g. experiment.only=[...].") \
                    from None


def run_experiment(cfg: Any, stream: Optional[TextIO] = None) -> list[dict[str, Any]]:
    """Run the arms of ``cfg.experiment`` one after another; returns each arm's sweep summary.

    Raises:
        ConfigError: a bad experiment setting, or an arm whose task cannot run here, before the first trial;
            a bad sweep setting before that arm's first trial (arms that ran keep their trials).
        SweepFailed: after all arms ran, when some arm's sweep stopped on repeated failures.
    """
    from rnnsearch.search.run import run_sweep

    out = stream or sys.stdout
    raw = cfg.get("experiment") if hasattr(cfg, "get") else None
    ExperimentSettings.from_config(raw)  # checks experiment.setting before the config interpolates it
    container = _resolve(cfg)
    settings = ExperimentSettings.from_config(container.get("experiment"))  # resolved factor levels
    if not isinstance(container.get("sweep"), dict):
        raise ConfigError(f"experiment {settings.name!r} has no sweep section: an experiment runs each arm as a "
                          "sweep, so its config needs `sweep:` (sampler, params, n_trials).")
    arms = settings.arms()
    cli = _cli_overrides()
    _check_tasks(container, arms)
    print(f"experiment {settings.name} ({settings.setting}): {len(arms)} arm(s), one study each; "
          f"MLflow experiment {settings.mlflow_experiment}", file=out)
    print("  arms: " + ", ".join(a.name for a in arms), file=out, flush=True)
    for note in _override_notes(cli, settings):
        print(f"note: {note}", file=out, flush=True)
    summaries: list[dict[str, Any]] = []
    failed: list[str] = []
    t0 = time.monotonic()
    for i, arm in enumerate(arms, 1):
        print(f"\n=== arm {i}/{len(arms)}: {arm.name} ===", file=out, flush=True)
        try:
            summary = run_sweep(arm_config(container, settings, arm), stream=out, sweep_name=settings.name, cli=cli)
        except SweepFailed as exc:
            failed.append(arm.name)
            print(f"arm {arm.name}: {exc}", file=out)
            continue
        summaries.append({"arm": arm.name, **summary})
    elapsed = time.monotonic() - t0
    _print_summary(out, settings, summaries, elapsed)
    if failed:
        raise SweepFailed(f"experiment {settings.name}: arm(s) {', '.join(failed)} stopped after repeated "
                          f"trial failures (see their messages above); the other arms finished.")
    return summaries


def _print_summary(out: TextIO, settings: ExperimentSettings, summaries: list[dict[str, Any]],
                   elapsed: float) -> None:
    print(f"\nexperiment {settings.name} ({settings.setting}) done in {elapsed / 60:.1f} min", file=out)
    width = max((len(s["arm"]) for s in summaries), default=3)
    print(f"  {'arm':<{width}}  complete  pruned  failed  best", file=out)
    for s in summaries:
        best = s.get("best_value")
        shown = f"{best:.4g}" if isinstance(best, float) else str(best)
        print(f"  {s['arm']:<{width}}  {s['complete']:>8}  {s['pruned']:>6}  {s['failed']:>6}  {shown}", file=out)
    print(f"tables and plots: python scripts/experiment_report.py {settings.name}"
          + (f" --setting {settings.setting}" if settings.setting != "small" else ""), file=out, flush=True)
