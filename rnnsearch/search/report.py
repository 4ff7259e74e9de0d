"""The sweep's closing report: the best trials (or the Pareto front) and the best composition as a config.

The table lists the top trials by the objective (for several objectives: the
Pareto front), with their searched params, objective values, parameter count,
epochs trained and state, followed by counts of pruned and failed trials. The
best composition is written as a complete Hydra config (``best_<study>.yaml``)
that reruns with ``python -m rnnsearch --config-dir . --config-name best_<study>``;
the same composition is also printed as plain overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TextIO

import optuna
from optuna.trial import FrozenTrial, TrialState

from .progress import fmt_value, trial_label


def ranked(study: optuna.Study, directions: Sequence[str], top: int) -> list[FrozenTrial]:
    """The best ``top`` complete trials (single objective), or the Pareto front sorted by the first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    sign = 1 if directions[0] == "minimize" else -1
    if len(directions) > 1:
        front = study.best_trials
        return sorted(front, key=lambda t: sign * t.values[0])
    return sorted(done, key=lambda t: sign * t.values[0])[:top]


def short_name(key: str) -> str:
    """``cell.name`` → ``cell``, ``model.wrappers.0.output_keep_prob`` → ``w0.output_keep_prob``, ``optim.lr`` → ``lr``."""
    key = key.replace("model.wrappers.", "w").replace("model.layers.", "L").replace("model.", "").replace("optim.", "")
    if key.endswith(".name"):
        key = key[:-5]
    return key.replace(".wrappers.", ".w")


def choices_text(params: Mapping[str, Any]) -> str:
    """A trial's sampled params as ``cell=lstm num_layers=2 lr=0.003 ...``."""
    return " ".join(f"{short_name(k)}={fmt_value(v)}" for k, v in params.items())


def table_rows(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: number, run name, objectives, size, epochs, state, choices."""
    header = ["#", "run", *objectives, "params", "epochs", "state", "choices"]
    rows = []
    for t in trials:
        n = t.user_attrs.get("params")
        rows.append([str(t.number), trial_label(t), *(fmt_value(v) for v in (t.values or [])),
                     f"{n:,}" if isinstance(n, int) else "?", str(t.user_attrs.get("epochs", "?")),
                     t.state.name.lower(), choices_text(t.params)])
    return header, rows


def print_table(header: list[str], rows: list[list[str]], title: str, stream: TextIO, rich: bool) -> None:
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="right" if h in ("#", "params", "epochs") else "left",
                             no_wrap=h != "choices", overflow="fold" if h == "choices" else "ellipsis")
        for r in rows:
            table.add_row(*r)
        Console(file=stream).print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(title, file=stream)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=stream)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=stream)


def state_counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out


def failure_summary(study: optuna.Study, limit: int = 3) -> list[str]:
    """The most common reasons of failed trials, most frequent first."""
    reasons: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        r = str(t.user_attrs.get("reason", "unknown error"))
        reasons[r] = reasons.get(r, 0) + 1
    return [f"{n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:limit]]


def write_best_config(path: str, cfg: Mapping[str, Any], trial: FrozenTrial, study_name: str,
                      objectives: Sequence[str], overrides: Optional[Sequence[str]]) -> str:
    """Write the trial's full config as a Hydra primary config; returns the command that reruns it."""
    from omegaconf import OmegaConf

    directory, name = os.path.split(os.path.abspath(path))
    config_name = name[:-5] if name.endswith(".yaml") else name
    rerun = f"python -m rnnsearch --config-dir {os.path.relpath(directory) if directory != os.getcwd() else '.'} " \
            f"--config-name {config_name}"
    values = ", ".join(f"{k} = {fmt_value(v)}" for k, v in zip(objectives, trial.values or []))
    header = [
        f"# Best trial {trial.number} ({trial_label(trial)}) of Optuna study '{study_name}': {values}.",
        "# The complete config of that trial, written by `python -m rnnsearch +sweep`. Rerun it with:",
        f"#   {rerun}",
    ]
    if overrides is not None:  # None: the study was resumed with other settings since the trial ran
        header += ["# or, as overrides of the default config:", f"#   python -m rnnsearch {' '.join(overrides)}"]
    body = OmegaConf.to_yaml(OmegaConf.create(dict(cfg)))
    os.makedirs(directory, exist_ok=True)
    with open(path if path.endswith(".yaml") else path + ".yaml", "w") as f:
        f.write("\n".join(header) + "\n" + body)
    return rerun


def report(study: optuna.Study, objectives: Sequence[str], directions: Sequence[str], top: int,
           stream: TextIO, rich: bool = False) -> Optional[FrozenTrial]:
    """Print the results table and counts; returns the best trial (None if no trial completed)."""
    trials = ranked(study, directions, top)
    counts = state_counts(study)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if not trials:
        print(f"study {study.study_name}: no completed trial ({summary or 'no trials'}).", file=stream)
    else:
        title = (f"Pareto front of study {study.study_name} ({len(trials)} trials)" if len(directions) > 1
                 else f"Best {len(trials)} trials of study {study.study_name}")
        header, rows = table_rows(trials, objectives)
        print_table(header, rows, f"{title}  [{summary}]", stream, rich)
    for line in failure_summary(study):
        print(f"  failed: {line}", file=stream)
    return trials[0] if trials else None
