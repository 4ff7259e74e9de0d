"""``run_sweep(cfg)``: the whole sweep, from the ``sweep`` config section to the closing report.

Steps: check the settings; parse the search space; open (or resume) the study
in its storage and recover trials orphaned by a killed earlier run; enqueue the
baseline compositions; open the tracking parent run; run the workers with the
live progress display; print the best trials; write the best composition as a
config; close the tracking run. A sweep stopped by ``sweep.max_failures``
raises :class:`~rnnsearch.search.errors.SweepFailed` after the report.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Optional, TextIO

from omegaconf import OmegaConf

from rnnsearch.errors import ConfigError, choice_error

from .compose import Composition, compose_trial, config_groups, load_group_options, override_list, replay
from .errors import SweepFailed
from .objective import CONFIG_ATTR, TrialObjective, as_json, pruning_key
from .progress import SweepProgress
from .report import report, write_best_config
from .settings import SweepSettings
from .space import LAYER_TEMPLATE, Param, describe, flatten, parse_space
from .study import (grid_space, make_pruner, make_sampler, make_storage, objectives_and_directions, open_study,
                    space_fingerprint, storage_spec, study_identity)
from .workers import WorkerJob, cpu_count, recover_orphans, resolve_workers, run_workers


def _hydra_info() -> tuple[Optional[str], list[str]]:
    """The sweep config's name and the user's command-line overrides, when run under ``@hydra.main``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return hc.runtime.choices.get("sweep"), list(hc.overrides.task)
    except Exception:  # not under @hydra.main (tests, the Python API)
        return None, []


def _max_layers(space: list[Param], base_layers: int) -> int:
    for p in space:
        if p.key == "model.num_layers":
            if p.fixed:
                return int(p.value)
            d = p.dist
            return int(max(d.choices) if hasattr(d, "choices") else d.high)
    return base_layers


def _check_enqueue(entries: list[Mapping[str, Any]], space: list[Param], max_layers: int,
                   out: TextIO) -> list[dict[str, Any]]:
    """Flatten ``sweep.enqueue`` entries; an unsearched key is dropped, a value outside its space skips the entry.

    Both with a note: the default entry sets keys a user may stop searching (``~sweep.params.cell.forget_bias``).
    """
    known: dict[str, Any] = {}
    for p in space:
        if not p.fixed:
            keys = [p.key.replace(LAYER_TEMPLATE, str(k)) for k in range(max_layers)] if LAYER_TEMPLATE in p.key \
                else [p.key]
            known.update((k, p.dist) for k in keys)
    result = []
    for i, entry in enumerate(entries):
        flat = dict(flatten(dict(entry)))
        flat = {(f"{k}.name" if f"{k}.name" in known and k not in known else k): v for k, v in flat.items()}
        bad = sorted(set(flat) - set(known))
        if bad:
            print(f"note: sweep.enqueue entry {i}: {', '.join(bad)} not searched by sweep.params, left out of the "
                  f"entry (searched keys: {', '.join(sorted(known))}).", file=out)
            flat = {k: v for k, v in flat.items() if k in known}
            if not flat:
                continue
        outside = [f"{k}={v!r}" for k, v in flat.items() if not _in_space(known[k], v)]
        if outside:
            print(f"note: sweep.enqueue entry {i} skipped: {', '.join(outside)} outside the search space.", file=out)
            continue
        result.append(flat)
    return result


def _check_objectives(objectives: list[str], first: dict[str, Any], params: list[Param], base: Mapping[str, Any],
                      group_options: Any) -> None:
    """Every objective is a number ``train()`` returns on every task the sweep may pick (else each trial would
    train, then fail)."""
    from rnnsearch.train import result_keys

    tasks = [first]
    searched = next((p for p in params if p.key == "task.name" and not p.fixed), None)
    if searched is not None:  # a space over tasks: each must return the objectives
        fixed = [p for p in params if p.fixed]
        tasks = [compose_trial(base, [], replay({}), group_options, [*fixed, Param("task.name", None, name)]).cfg
                 for name in searched.dist.choices]
    for cfg in tasks:
        available = result_keys(cfg)
        missing = [o for o in objectives if o not in available]
        if missing:
            raise ConfigError(f"sweep.objectives {missing} are not results of a trial on task "
                              f"'{cfg['task']['name']}'; valid objectives there: {', '.join(sorted(available))}.")


def _check_names(params: list[Param]) -> None:
    """Every cell, wrapper, task and optimizer name the sweep may pick exists (else each trial would fail)."""
    from rnnsearch.cells import list_cells, list_wrappers
    from rnnsearch.tasks import list_tasks
    from rnnsearch.train import OPTIMIZERS

    registries = [(re.compile(r"(model\.layers\.[^.]+\.)?cell\.name$"), list_cells),
                  (re.compile(r"model\.(layers\.[^.]+\.)?wrappers\.[^.]+\.name$"), lambda: [*list_wrappers(), "none"]),
                  (re.compile(r"task\.name$"), list_tasks), (re.compile(r"optim\.name$"), lambda: list(OPTIMIZERS))]
    for p in params:
        for pattern, names in registries:
            if pattern.match(p.key):
                values = [p.value] if p.fixed else list(getattr(p.dist, "choices", ()))
                valid = names()
                for v in values:
                    if v is not None and str(v) not in valid:
                        raise choice_error(f"{p.key} in sweep.{'overrides' if p.fixed else 'params'}", v, valid)


def _forward_only(space: list[Param], task: str, out: TextIO) -> list[Param]:
    """A causal task's space without ``model.bidirectional=true`` (a backward direction would read the targets)."""
    from optuna.distributions import CategoricalDistribution

    result = []
    for p in space:
        if p.key == "model.bidirectional" and not p.fixed and True in getattr(p.dist, "choices", ()):
            choices = tuple(c for c in p.dist.choices if c is not True)
            if not choices:
                raise ConfigError(f"sweep.params.model.bidirectional={p.text or 'choice(true)'} leaves nothing "
                                  f"to search on task '{task}', which refuses bidirectional models (its targets "
                                  f"are the next steps' inputs); use choice(false) or drop the key.")
            print(f"note: task '{task}' predicts the next step from the ones before it (a backward direction "
                  f"would read the targets): model.bidirectional is searched over {list(choices)} only.", file=out)
            p = replace(p, dist=CategoricalDistribution(choices))
        result.append(p)
    return result


def _check_compatible(study: Any, space: list[Param], study_name: str) -> None:
    """Optuna keeps a param's kind (and a categorical's choices) fixed within a study: check before resuming."""
    from optuna.distributions import check_distribution_compatibility

    seen: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        seen.update(t.distributions)
    for p in space:
        if p.fixed:
            continue
        pattern = re.compile(re.escape(p.key).replace(re.escape(LAYER_TEMPLATE), r"\d+") + "$")
        for key, old in seen.items():
            if not pattern.match(key):
                continue
            try:
                check_distribution_compatibility(old, p.dist)
            except ValueError as exc:
                raise ConfigError(
                    f"sweep.params.{p.key} is now {p.text!r}, but study {study_name!r} already has trials with "
                    f"{key} from {describe(old)} ({exc}). Optuna cannot change that within a study: set "
                    f"sweep.study_name=NEW for a new study, or keep the old space.") from None


def _in_space(dist: Any, value: Any) -> bool:
    if hasattr(dist, "choices"):
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in dist.choices)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not dist.low <= value <= dist.high:
        return False
    step = getattr(dist, "step", None)  # range(32, 129, 32) holds 32, 64, ... but not 48
    return not step or math.isclose((value - dist.low) / step, round((value - dist.low) / step), abs_tol=1e-9)


def _cli_wins(fixed: list[Param], cli: list[str]) -> tuple[list[Param], list[str]]:
    """Drop the ``sweep.overrides`` entries the user set on the command line (``task.seq_len=100``, ``task=copy``)."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in cli}
    keys = {k for k in keys if not k.startswith(("sweep", "hydra"))}

    def shadowed(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))

    return [p for p in fixed if not shadowed(p.key)], [f"{p.key}={p.value!r}" for p in fixed if shadowed(p.key)]


def _user_overrides(cli: list[str], trial: list[str], cfg: Mapping[str, Any]) -> list[str]:
    """The user's command-line overrides that still apply next to the trial's.

    Drops sweep keys, keys the trial sets itself, and keys the trial's config
    does not have (``cell.forget_bias`` once the trial switched to ``cell=gru``).
    """
    def key(o: str) -> str:
        return o.lstrip("+~").split("=", 1)[0]

    taken = {key(o) for o in trial}
    return [o for o in cli if not key(o).startswith("sweep") and key(o) not in taken
            and ("." not in key(o) or _has_key(cfg, key(o)))]


def _has_key(cfg: Mapping[str, Any], dotted: str) -> bool:
    node: Any = cfg
    for seg in dotted.split("."):
        if isinstance(node, Mapping) and (seg in node or (seg.isdigit() and int(seg) in node)):
            node = node[seg] if seg in node else node[int(seg)]
        elif isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            return False
    return True


def run_sweep(cfg: Any, stream: Optional[TextIO] = None, *, sweep_name: Optional[str] = None,
              cli: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the sweep ``cfg.sweep`` describes on the composition ``cfg``; returns a summary.

    Args:
        cfg: the composed config (DictConfig or mapping) with a ``sweep`` section.
        stream: where progress and the report go (default stdout).
        sweep_name: names the default study (``<sweep_name>-<task>``); default: the ``sweep`` option chosen.
        cli: the user's command-line overrides (they beat ``sweep.overrides``); default: Hydra's.

    Returns:
        ``{"study", "storage", "trials", "complete", "pruned", "failed", "best_value", "best_params",
        "best_config", "rerun", "stopped"}``.

    Raises:
        ConfigError: a bad sweep setting, search space or storage, before any trial runs.
        SweepFailed: the last ``sweep.max_failures`` trials all failed (after the report).
    """
    import optuna

    out = stream or sys.stdout
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    settings = SweepSettings.from_config(container.get("sweep"))
    base = {k: v for k, v in container.items() if k not in ("sweep", "hydra")}
    hydra_name, hydra_cli = _hydra_info()
    sweep_name = sweep_name or hydra_name
    cli_overrides = hydra_cli if cli is None else list(cli)

    groups = config_groups([k for k, v in base.items() if isinstance(v, Mapping)])
    space = parse_space(settings.params, groups)
    fixed, shadowed = _cli_wins(parse_space(settings.overrides, groups), cli_overrides)
    wanted: dict[str, set[Any]] = {}
    for p in [*fixed, *space]:
        head, _, rest = p.key.partition(".")
        if rest == "name" and head in groups:
            wanted.setdefault(head, set()).update(p.dist.choices if not p.fixed and hasattr(p.dist, "choices")
                                                  else [p.value])
    for head in wanted:  # the base option too: to tell the user's edits of it from its file
        if isinstance(base.get(head), Mapping) and "name" in base[head]:
            wanted[head].add(base[head]["name"])
    group_options = load_group_options(wanted)
    if not any(not p.fixed for p in space):
        raise ConfigError("sweep.params has nothing to search: give at least one choice(...), range(...) or "
                          "interval(...), e.g. sweep.params.model.hidden_size='choice(32,64)'.")

    _check_names([*fixed, *space])
    first = compose_trial(base, [], replay({}), group_options, fixed)  # base + sweep.overrides
    from rnnsearch.tasks import TASKS
    from rnnsearch.tasks.base import check_direction

    task_cls = TASKS.get(first.cfg["task"]["name"])
    check_direction(task_cls, first.cfg.get("model"))  # bidirectional fixed by the overrides: stop before starting
    if task_cls.causal:
        space = _forward_only(space, task_cls.registry_name, out)
    objectives, directions = objectives_and_directions(settings, task_cls.metric, task_cls.direction)
    _check_objectives(objectives, first.cfg, [*fixed, *space], base, group_options)
    study_name = settings.study_name or f"{sweep_name or 'sweep'}-{first.cfg['task']['name']}"
    spec = storage_spec(settings.storage, study_name)
    n, devices = resolve_workers(settings.workers)
    if n > 1 and spec.startswith("sqlite"):
        warnings.warn("SQLite storage with several workers may hit 'database is locked'; the default journal "
                      "file (sweep.storage=null) or PostgreSQL is safer.", stacklevel=2)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(spec, settings)
    study = open_study(study_name, storage, directions)
    fingerprint = space_fingerprint(space, objectives)
    old = study.user_attrs.get("rnnsearch_space")
    if old is None:
        study.set_user_attr("rnnsearch_space", fingerprint)
    elif old != fingerprint:
        print(f"note: study {study_name} was started with another search space or objective; "
              f"new trials use the current one.", file=out)
    _check_compatible(study, space, study_name)
    orphans = recover_orphans(study, settings.max_retry)
    if orphans:
        print(f"note: trial(s) {orphans} were left running by a worker that is gone; marked FAIL and re-queued.",
              file=out)
    max_layers = _max_layers(space, int(first.cfg.get("model", {}).get("num_layers", 1)))
    epochs = int(first.cfg.get("train", {}).get("epochs", 1))
    n_trials = settings.n_trials
    enqueued = _check_enqueue(settings.enqueue, space, max_layers, out)
    if settings.sampler == "grid":  # past its size a grid only repeats points (GridSampler re-runs one at random);
        # GridSampler leaves an enqueued trial's point unvisited, so those come on top
        n_trials = min(n_trials, math.prod(len(v) for v in grid_space(space, max_layers).values()) + len(enqueued))
    # the workers build these; a bad option must stop the sweep here, once, before any run or worker starts
    make_sampler(settings, space, settings.seed, n_trials, max_layers)
    make_pruner(settings, epochs)

    for params in enqueued:
        study.enqueue_trial(params, skip_if_exists=True)

    trials = study.get_trials(deepcopy=False)
    waiting = [t.number for t in trials if t.state == optuna.trial.TrialState.WAITING]
    start_number = min([*waiting, len(trials)])  # this run's trials: the queued ones and all new ones
    finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    key = pruning_key(objectives[0]) if len(objectives) == 1 else None
    prune = settings.pruner != "none" and key is not None
    _print_header(out, study_name, spec, settings, n, devices, objectives, directions, space, finished, prune)
    if shadowed:
        print(f"note: your command line overrides sweep.overrides {', '.join(shadowed)}", file=out)

    from rnnsearch.tracking import finish_sweep_run, start_sweep_run

    study_id, created = study_identity(study, spec)
    # a study from before the ids (it has run trials, and had none): its parent run has no id tag yet
    legacy = created and any(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))
    parent_run_id = start_sweep_run(cfg, study_name, study_id, adopt_untagged=legacy)
    ended = False
    try:
        objective = TrialObjective(base=base, space=space, fixed=fixed, groups=group_options, objectives=objectives,
                                   prune_key=key or "", prune=prune, max_params=settings.max_params,
                                   study_name=study_name, parent_run_id=parent_run_id,
                                   skip_duplicates=settings.sampler == "grid")
        threads = max(1, cpu_count() // n) if n > 1 and devices[0] is None else None
        job = WorkerJob(settings=settings, storage=spec, study_name=study_name, objective=objective,
                        n_trials=n_trials, start_number=start_number, epochs=epochs, max_layers=max_layers,
                        threads=threads)
        progress = SweepProgress(study_name, n_trials, objectives, directions, start_number, n,
                                 mode=settings.progress, stream=out)
        poll_study = optuna.load_study(study_name=study_name, storage=make_storage(spec, settings))
        progress.start()
        t0 = time.monotonic()
        interrupted = False
        stopped: Optional[str] = None
        try:
            stopped = run_workers(job, devices, poll=lambda: progress.update(poll_study.get_trials(deepcopy=False)),
                                  log=lambda m: print(m, file=out, flush=True))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            progress.update(poll_study.get_trials(deepcopy=False))
            progress.close()
        elapsed = time.monotonic() - t0

        study = optuna.load_study(study_name=study_name, storage=make_storage(spec, settings))
        best = report(study, objectives, directions, settings.top, out, rich=progress.mode == "live")
        summary: dict[str, Any] = {"study": study_name, "storage": spec, "seconds": elapsed, "stopped": stopped}
        for state in ("complete", "pruned", "fail"):
            summary["failed" if state == "fail" else state] = len(study.get_trials(
                deepcopy=False, states=(getattr(optuna.trial.TrialState, state.upper()),)))
        summary["trials"] = summary["complete"] + summary["pruned"]
        summary.update(best_value=None, best_params=None, best_config=None, rerun=None)
        if best is not None:
            summary.update(best_value=best.values[0] if len(best.values) == 1 else list(best.values),
                           best_params=dict(best.params), best_number=best.number)
            best_cfg, overrides = _best_composition(best, base, space, fixed, group_options, groups, cli_overrides, out)
            if settings.best_config:
                path = settings.best_config.format(study=study_name)
                rerun = write_best_config(path, best_cfg, best, study_name, objectives, overrides)
                summary.update(best_config=path, rerun=rerun)
                print(f"best composition (trial {best.number}) written to {path}; rerun it with:\n  {rerun}", file=out)
            if overrides is not None:
                print(f"or as overrides:\n  python -m rnnsearch {' '.join(overrides)}", file=out)
            summary["overrides"] = overrides
        if interrupted or (stopped and stopped.startswith("stopped")):
            finish_sweep_run(cfg, parent_run_id, study, status="KILLED" if interrupted else "FAILED")
        else:
            finish_sweep_run(cfg, parent_run_id, study)
        ended = True
        if interrupted:
            print("interrupted: finished trials are stored; rerun the same command to resume.", file=out)
            raise KeyboardInterrupt
        if stopped and stopped.startswith("stopped"):
            raise SweepFailed(f"sweep {study_name} {stopped}")
        return summary
    except Exception:
        if not ended:  # never leave the parent run RUNNING (a bad best_config path, a broken storage, ...)
            finish_sweep_run(cfg, parent_run_id, study, status="FAILED")
        raise


def _best_composition(best: Any, base: Mapping[str, Any], space: list[Param], fixed: list[Param],
                      group_options: Any, groups: list[str], cli_overrides: list[str],
                      out: TextIO) -> tuple[dict[str, Any], Optional[list[str]]]:
    """The best trial's config, and the overrides of the default config that rerun it (None: none do).

    The trial's own record (``CONFIG_ATTR``) wins: a resumed study may have changed the space, the overrides or
    the command line since the trial ran, and recomposing its params with today's settings would then write
    another model, or another budget, than the one that scored best.
    """
    recorded = best.user_attrs.get(CONFIG_ATTR)
    try:
        comp: Optional[Composition] = compose_trial(base, space, replay(best.params), group_options, fixed)
    except ConfigError:  # e.g. a key searched now that the trial never sampled
        comp = None
    if comp is not None and (recorded is None or _as_stored(comp.cfg, NEUTRAL) == _as_stored(recorded, NEUTRAL)):
        overrides = _trial_overrides(comp, base, fixed, group_options, groups)
        return comp.cfg, _user_overrides(cli_overrides, overrides, comp.cfg) + overrides
    if recorded is None:
        raise ConfigError(f"The best trial {best.number} cannot be recomposed with this sweep's settings and "
                          f"predates the recorded configs; rerun it from its params: {dict(best.params)}.")
    print(f"note: trial {best.number} (the best) ran with other settings than this run's (the study was resumed "
          f"with another space, sweep.overrides or command line): its config is written as it trained, and no "
          f"override list is printed.", file=out)
    return dict(recorded), None


#: Sections that do not change what a trial trains (where it logs, which device): a resume may change them.
NEUTRAL = ("tracking", "device", "hydra")


def _as_stored(cfg: Mapping[str, Any], leave_out: tuple[str, ...] = ()) -> Any:
    """``cfg`` as a JSON storage gives it back (tuples as lists, int keys as strings), to compare records."""
    return as_json({k: v for k, v in cfg.items() if k not in leave_out})


def _trial_overrides(comp: Composition, base: Mapping[str, Any], fixed: list[Param], group_options: Any,
                     groups: list[str]) -> list[str]:
    group_params = [Param(k, None, v) for k, v in comp.params.items()
                    if k.endswith(".name") and k.split(".")[0] in groups and k.count(".") == 1]
    reference = compose_trial(base, [], replay({}), group_options, [*fixed, *group_params]).cfg
    return override_list(comp, groups, reference)


def _print_header(out: TextIO, study_name: str, spec: str, settings: SweepSettings, n: int, devices: list,
                  objectives: list[str], directions: list[str], space: list[Param], finished: int,
                  prune: bool) -> None:
    where = ", ".join(f"GPU {d}" for d in devices) if devices and devices[0] is not None else "CPU"
    resume = f" (resuming: {finished} already finished)" if finished else ""
    objs = ", ".join(f"{o} ({d[:3]})" for o, d in zip(objectives, directions))
    why = "multi-objective" if len(objectives) > 1 else f"{objectives[0]} has no per-epoch value"
    pruner = settings.pruner if prune else (f"none ({why})" if settings.pruner != "none" else "none")
    print(f"sweep {study_name}: {settings.n_trials} trials{resume}, {n} worker(s) on {where}; "
          f"sampler {settings.sampler} (seed {settings.seed}), pruner {pruner}; objective {objs}", file=out)
    shown = re.sub(r"(://[^:/@]+:)[^/]*@", r"\1***@", spec)  # no password in logs
    print(f"storage: {shown}", file=out)
    width = max((len(p.key) for p in space), default=0)
    for p in space:
        print(f"  {p.key:<{width}}  {describe(p.dist, p.value)}", file=out)
    out.flush()
