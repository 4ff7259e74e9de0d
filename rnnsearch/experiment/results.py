"""An experiment's results, rebuilt from its MLflow runs alone.

:func:`load` reads every trial (child run) of the MLflow experiment
``<name>-<setting>`` and joins it with its arm (the parent run's ``arm`` and
``level.<factor>`` tags). From those records: :func:`arm_table` (per arm:
trials, success rate, test metric, time to solve), :func:`variant_table` (per
level of one factor, against a reference level with Welch's t-test) and
:func:`importances` (Optuna's fANOVA and PED-ANOVA over the searched params,
the factor included as a categorical, with distributions parsed from the
sweep's logged ``sweep.params``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

ROLE_TAG = "rnnsearch.role"


@dataclass
class Trial:
    """One trial's MLflow run: its arm, levels, state, config params, final metrics and per-epoch history."""

    run_id: str
    study: str
    arm: str
    levels: dict[str, str]
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(epoch, value)]

    @property
    def metric(self) -> str:
        """The task's headline metric name (``mse``, ``accuracy``, ``nll``)."""
        return self.tags.get("metric", "val/loss").split("/", 1)[-1]

    @property
    def minimize(self) -> bool:
        return self.tags.get("direction", "minimize") == "minimize"

    def value(self, key: str) -> Optional[float]:
        v = self.metrics.get(key)
        return v if v is not None and math.isfinite(v) else None

    @property
    def test(self) -> Optional[float]:
        return self.value(f"test/{self.metric}")

    @property
    def solved_at(self) -> Optional[float]:
        return float(self.tags["solved_at"]) if "solved_at" in self.tags else None

    @property
    def baseline(self) -> Optional[float]:
        return float(self.tags["baseline"]) if "baseline" in self.tags else None

    def beats(self, value: float, threshold: float) -> bool:
        return value < threshold if self.minimize else value > threshold

    def curve(self, key: Optional[str] = None) -> list[tuple[int, float]]:
        """``[(epoch, value)]`` of a per-epoch metric (default ``val/<metric>``)."""
        return self.history.get(key or f"val/{self.metric}", [])

    def time_to_solve(self) -> Optional[tuple[int, float]]:
        """(epoch, seconds) when the validation metric first passed the task's threshold; None: never.

        The seconds are the epochs' wall time up to and including that epoch (training and validation).
        """
        if self.solved_at is None:
            return None
        for epoch, v in self.curve():
            if self.beats(v, self.solved_at):
                return epoch, float(sum(s for e, s in self.curve("epoch_seconds") if e <= epoch))
        return None

    def lookup(self, key: str) -> Any:
        """A config value by dotted key; lists are one JSON param (``model.wrappers``), indexed into."""
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in self.params:
                value = _parse(self.params[head])
                try:
                    for seg in parts[cut:]:
                        value = value[int(seg)] if isinstance(value, list) else value[seg]
                except (KeyError, IndexError, TypeError, ValueError):
                    continue  # e.g. the short choice param "cell" above the dotted "cell.name"
                return value
        raise KeyError(key)


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"true": True, "false": False, "null": None}.get(text, text)


def load(uri: str, experiment: str, histories: bool = True) -> list[Trial]:
    """Every trial run of the MLflow experiment ``experiment`` (raises ValueError when it does not exist)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"No MLflow experiment {experiment!r} at {uri}; experiments there: "
                         f"{', '.join(names) or '(none)'}. Run the experiment first, or pass --uri.")
    runs = _all_runs(client, exp.experiment_id)
    sweeps = sorted((r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"), key=lambda r: r.info.start_time)
    parents = {r.data.tags.get("study"): r for r in sweeps}  # per study name, its latest study's parent run
    trials = []
    for r in runs:
        tags = r.data.tags
        if tags.get(ROLE_TAG) == "sweep" or "study" not in tags:
            continue
        parent = parents.get(tags["study"])
        if parent is not None and tags.get("mlflow.parentRunId", parent.info.run_id) != parent.info.run_id:
            continue  # a trial of an earlier study under the same name (its storage deleted since)
        ptags = parent.data.tags if parent is not None else {}
        levels = {k.split(".", 1)[1]: v for k, v in ptags.items() if k.startswith("level.")}
        t = Trial(run_id=r.info.run_id, study=tags["study"], arm=ptags.get("arm", tags["study"]), levels=levels,
                  state=tags.get("trial_state", r.info.status), params=dict(r.data.params),
                  metrics=dict(r.data.metrics), tags=dict(tags))
        if histories:
            for key in (f"val/{t.metric}", "epoch_seconds"):
                hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
                t.history[key] = [(int(m.step), float(m.value)) for m in hist]
        trials.append(t)
    trials.sort(key=lambda t: (t.study, int(t.tags.get("trial", 0))))
    return trials


def in_order(trials: Sequence[Trial], factors: Mapping[str, Sequence[str]]) -> list[Trial]:
    """The trials sorted by their levels in the order the experiment lists them (first factor slowest)."""
    def key(t: Trial) -> tuple:
        return (*(list(levels).index(t.levels[f]) if t.levels.get(f) in levels else len(levels)
                  for f, levels in factors.items()), t.study, int(t.tags.get("trial", 0)))

    return sorted(trials, key=key)


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def sweep_params(uri: str, experiment: str) -> dict[str, str]:
    """The ``sweep.params`` a parent run of the experiment logged, as dotted keys (the search space as written)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1)
    if not runs:
        return {}
    from rnnsearch.search.space import flatten

    prefix = "sweep.params."
    nested: dict[str, Any] = {}
    for k, v in runs[0].data.params.items():
        if k.startswith(prefix):
            node = nested
            *heads, last = k[len(prefix):].split(".")
            for h in heads:
                node = node.setdefault(h, {})
            node[last] = _parse(v) if v.startswith("[") else v  # a list param (wrapper slots) is one JSON value
    return dict(flatten(nested))


def _fmt(v: Optional[float], digits: int = 4) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}"


def _median(values: Sequence[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def arm_table(trials: Sequence[Trial], factors: Sequence[str],
              extra: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Per arm (in the trials' order): trials, how many solved, test metric, time to solve.

    ``trials`` counts complete / all finished trials (a pruned trial diverged, or was rejected before
    training: it counts as not solved). ``solved`` is judged on the test split (the best-validation
    weights). Time to solve is the median, over the trials whose validation metric passed the threshold
    (how many in brackets), of the first such epoch and of the wall seconds of the epochs up to it.
    ``extra`` adds the median of more test metrics (e.g. ``recall_acc``), "–" where an arm lacks one.
    """
    header = [*factors, "trials", "solved (test)", "median test", "best test", "baseline", "epochs to solve (val)",
              "seconds to solve", *(f"median test {m}" for m in extra)]
    rows = []
    for arm, group in _by_arm(trials).items():
        done = [t for t in group if t.state == "COMPLETE"]
        ended = [t for t in group if t.state in ("COMPLETE", "PRUNED")]
        tests = [t.test for t in done if t.test is not None]
        first = group[0]
        best = (min(tests) if first.minimize else max(tests)) if tests else None
        hits = [s for s in (t.time_to_solve() for t in done) if s is not None]
        solved = sum(bool(t.metrics.get("solved")) for t in done)
        n = f" ({len(hits)})" if hits else ""
        rows.append([*(first.levels.get(f, "") for f in factors), f"{len(done)}/{len(ended)}",
                     f"{solved}/{len(ended)}" if first.solved_at is not None else "–",
                     f"{_fmt(_median(tests))} {first.metric}" if tests else "–", _fmt(best),
                     _fmt(first.baseline), _fmt(_median([float(e) for e, _ in hits]), 3) + n,
                     _fmt(_median([s for _, s in hits]), 3) + n,
                     *(_fmt(_median([t.value(f"test/{m}") for t in done if t.value(f"test/{m}") is not None]))
                       for m in extra)])
    return header, rows


def _by_arm(trials: Sequence[Trial]) -> dict[str, list[Trial]]:
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.study, []).append(t)
    return groups


def variant_table(trials: Sequence[Trial], factor: str, reference: str, group_by: Sequence[str] = (),
                  paired: bool = False) -> tuple[list[str], list[list[str]]]:
    """Per level of ``factor`` (within each ``group_by`` combination): test-metric summary vs ``reference``.

    A two-sided t-test on the test metric of the complete trials: Welch's, or with ``paired`` the paired
    t-test over the trial numbers both levels completed (their studies drew the same hyperparameters for
    the same trial number). The p-values of one group are Holm-corrected for the number of levels
    compared; the verdict ("worse"/"better" at corrected p < 0.05, else "n.s.") uses the corrected value.
    ``pruned`` counts trials that diverged or were rejected.
    """
    from scipy import stats

    header = [*group_by, factor, "trials", "pruned", "median test", "mean test", "best test", "p vs " + reference,
              "Holm p", "verdict"]
    rows = []
    cells: dict[tuple[str, ...], dict[str, list[Trial]]] = {}
    for t in trials:
        if t.state not in ("COMPLETE", "PRUNED"):
            continue
        key = tuple(t.levels.get(g, "") for g in group_by)
        cells.setdefault(key, {}).setdefault(t.levels.get(factor, ""), []).append(t)
    for key, levels in cells.items():
        ref = [t.test for t in levels.get(reference, []) if t.state == "COMPLETE" and t.test is not None]
        raw: dict[str, float] = {}
        for level, group in levels.items():
            values = [t.test for t in group if t.state == "COMPLETE" and t.test is not None]
            if level == reference:
                continue
            if paired:
                mine, theirs = _by_number(group), _by_number(levels.get(reference, []))
                both = sorted(set(mine) & set(theirs))
                if len(both) > 1:
                    p = float(stats.ttest_rel([mine[n] for n in both], [theirs[n] for n in both]).pvalue)
                    raw[level] = p if math.isfinite(p) else 1.0
            elif len(values) > 1 and len(ref) > 1:
                p = float(stats.ttest_ind(values, ref, equal_var=False).pvalue)
                raw[level] = p if math.isfinite(p) else 1.0
        holm = holm_correct(raw)
        for level, group in levels.items():
            values = [t.test for t in group if t.state == "COMPLETE" and t.test is not None]
            pruned = sum(t.state == "PRUNED" for t in group)
            if not values:
                rows.append([*key, level, "0", str(pruned), "–", "–", "–", "–", "–", "–"])
                continue
            minimize = group[0].minimize
            best = min(values) if minimize else max(values)
            verdict = "reference" if level == reference else "–"
            if level in holm:
                worse = (statistics.mean(values) > statistics.mean(ref)) == minimize
                verdict = ("worse" if worse else "better") if holm[level] < 0.05 else "n.s."
            rows.append([*key, level, str(len(values)), str(pruned), _fmt(_median(values)),
                         _fmt(statistics.mean(values)), _fmt(best), _fmt(raw.get(level), 2),
                         _fmt(holm.get(level), 2), verdict])
    return header, rows


def _by_number(group: Sequence[Trial]) -> dict[int, float]:
    return {int(t.tags.get("trial", -1)): t.test for t in group if t.state == "COMPLETE" and t.test is not None}


def holm_correct(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values (monotone, capped at 1)."""
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        out[name] = running
    return out


def importances(trials: Sequence[Trial], space: Mapping[str, str], factor: Optional[str] = None,
                seed: int = 0) -> dict[str, dict[str, float]]:
    """fANOVA and PED-ANOVA importances of the searched params (and ``factor``) for the trials' objective.

    ``space`` is ``sweep.params`` as logged (``{"optim.lr": "tag(log, interval(...))"}``); the objective
    is each trial's ``best/val/<metric>``, what the sweep optimised. Needs at least 4 complete trials.
    """
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

    from rnnsearch.search.space import parse_param

    dists = {k: p.dist for k, p in ((k, parse_param(k, v)) for k, v in space.items()) if not p.fixed}
    done = [t for t in trials if t.state == "COMPLETE" and t.value(f"best/val/{t.metric}") is not None]
    if len(done) < 4:
        return {}
    if factor:
        dists[factor] = CategoricalDistribution(sorted({t.levels.get(factor, "") for t in done}))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="minimize" if done[0].minimize else "maximize")
    for t in done:
        try:
            params = {k: (t.levels.get(factor, "") if k == factor else _cast(t.lookup(k), dists[k])) for k in dists}
        except (KeyError, TypeError, ValueError):  # a conditional param this trial did not have
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=t.value(f"best/val/{t.metric}")))
    out = {}
    for name, evaluator in (("fANOVA", FanovaImportanceEvaluator(seed=seed)),
                            ("PED-ANOVA", PedAnovaImportanceEvaluator())):
        out[name] = dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    return out


def _cast(value: Any, dist: Any) -> Any:
    from optuna.distributions import IntDistribution

    if hasattr(dist, "choices"):
        return next((c for c in dist.choices if str(c) == str(value)), value)
    return int(value) if isinstance(dist, IntDistribution) else float(value)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
