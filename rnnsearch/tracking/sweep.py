"""A sweep in MLflow: an experiment named after the Optuna study, one parent run, a child run per trial.

:func:`start_parent` finds the study's parent run by its tags (so a resumed
study, or a second worker process or machine, reuses it) or creates it; trials
then link to it with ``mlflow.parentRunId`` (:class:`.run.MlflowRun`), which
works from any process. :func:`finish_parent` attaches the study's summary —
Optuna plots, the top-trials table, the objective per trial as a metric with
``step=trial number`` — and ends the parent run.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from rnnsearch.tracking import worker
from rnnsearch.tracking.settings import TrackingSettings, flatten, to_dict

ROLE_TAG = "rnnsearch.role"  # "sweep" on parent runs
STUDY_TAG = "study"


STUDY_ID_TAG = "rnnsearch.study_id"  # the Optuna study's own id: a new study under an old name gets a new parent


def _parents(client: Any, experiment_id: str, study_name: str, study_id: Optional[str]) -> list[Any]:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1000)
    runs = [r for r in runs if r.data.tags.get(STUDY_TAG) == study_name
            and (study_id is None or r.data.tags.get(STUDY_ID_TAG) == study_id)]
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def start_parent(settings: TrackingSettings, cfg: Any, study_name: str, study_id: Optional[str] = None,
                 adopt_untagged: bool = False) -> str:
    """Create or reuse the parent run of ``study_name`` (of the study with ``study_id``); returns its run id.

    ``study_id`` tells a resumed study (same id: its parent is reused) from a new study under a name used
    before (its journal deleted, say): that one gets its own parent run, not the old study's summary.
    ``adopt_untagged``: the study was started by a version without ids; its parent (no id tag) is reused
    and tagged.
    """
    uri = settings.uri
    client = worker.client(uri)
    if settings.sweep_experiment:
        eid = worker.experiment_id(uri, settings.sweep_experiment, tags={
            "mlflow.note.content": f"rnnsearch experiment `{settings.sweep_experiment}`: one parent run per arm "
                                   "(an Optuna study), one child run per trial."})
    else:
        eid = worker.experiment_id(uri, study_name, tags={"mlflow.note.content": f"Optuna study `{study_name}` "
                                                          "(rnnsearch sweep): one child run per trial."})
    found = _parents(client, eid, study_name, study_id)
    if not found and adopt_untagged and study_id:
        found = [r for r in _parents(client, eid, study_name, None) if STUDY_ID_TAG not in r.data.tags]
        if found:
            client.set_tag(found[0].info.run_id, STUDY_ID_TAG, study_id)
    full = {k: v for k, v in to_dict(cfg).items() if k != "hydra"}
    if isinstance(full.get("sweep"), dict):  # the saved config resumes this very study
        full["sweep"]["study_name"] = study_name
    params = {"study": study_name, **flatten({"sweep": full.get("sweep") or {}})}
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
        params = {k: v for k, v in params.items() if k not in run.data.params}  # params are write-once
    else:
        run = client.create_run(eid, run_name=study_name, tags=worker.run_tags(
            {ROLE_TAG: "sweep", STUDY_TAG: study_name, **({STUDY_ID_TAG: study_id} if study_id else {}),
             **(settings.sweep_tags or {})}))
        found = _parents(client, eid, study_name, study_id)
        if found and found[0].info.run_id != run.info.run_id:  # lost a creation race with another worker
            client.delete_run(run.info.run_id)
            run = found[0]
            params = {}
    run_id = run.info.run_id
    worker.log_params(uri, run_id, params)
    import yaml

    client.log_text(run_id, "# The resolved config of this sweep. Rerun (resume) it with\n"
                    "#   python -m rnnsearch --config-path \"$(realpath DIR)\" --config-name config\n"
                    + yaml.safe_dump(full, sort_keys=False), "config.yaml")
    return run_id


def _children(client: Any, experiment_id: str, parent_run_id: str) -> dict[int, Any]:
    """The parent's child runs by trial number."""
    runs: dict[int, Any] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        for r in page:
            trial = r.data.tags.get("trial")
            if trial is not None and trial.lstrip("-").isdigit():
                runs[int(trial)] = r
        token = page.token
        if not token:
            return runs


def _end_orphans(client: Any, children: dict[int, Any], trials: list[Any]) -> None:
    """End FAILED the child runs still RUNNING whose trial failed: their worker died before it could end them."""
    import optuna
    from mlflow.entities import RunTag

    for t in trials:
        run = children.get(t.number)
        if run is None or run.info.status != "RUNNING" or t.state != optuna.trial.TrialState.FAIL:
            continue
        reason = str(t.user_attrs.get("reason", "the trial failed"))[:5000]
        client.log_batch(run.info.run_id, tags=[RunTag("trial_state", "FAIL"), RunTag("failure_reason", reason)])
        client.set_terminated(run.info.run_id, "FAILED")


def finish_parent(settings: TrackingSettings, parent_run_id: str, study: Any, status: str = "FINISHED") -> None:
    """Log the study's plots, top-trials table and per-trial objective on the parent run, then end it."""
    import optuna
    from mlflow.entities import Metric, RunTag

    client = worker.client(settings.uri)
    parent = client.get_run(parent_run_id)
    children = _children(client, parent.info.experiment_id, parent_run_id)
    run_names = {n: r.info.run_name for n, r in children.items()}
    trials = study.get_trials(deepcopy=False)
    _end_orphans(client, children, trials)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = [t.state.name.lower() for t in trials]
    now = int(parent.info.start_time)
    metrics = [Metric(f"trials/{s}", float(states.count(s)), now, 0) for s in ("complete", "pruned", "fail")]
    tags = [RunTag("n_trials", str(len(trials)))]
    # The objective per trial (step = trial number): the parent's chart is the optimization history.
    logged = {m.step for m in client.get_metric_history(parent_run_id, "value")} if done else set()
    single = len(study.directions) == 1
    if single:
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        best: Optional[float] = None
        for t in sorted(done, key=lambda t: t.number):
            v = t.values[0]
            if best is None or (v > best if maximize else v < best):
                best = v
            if t.number not in logged and math.isfinite(v):
                stamp = int(t.datetime_complete.timestamp() * 1000) if t.datetime_complete else now
                metrics += [Metric("value", v, stamp, t.number), Metric("best_value", best, stamp, t.number)]
    if single and done:
        bt = study.best_trial
        tags += [RunTag("best_trial", str(bt.number)), RunTag("best_run", run_names.get(bt.number, "")),
                 RunTag("best_params", str(bt.params)[:5000])]
    for i in range(0, len(metrics), 1000):
        client.log_batch(parent_run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
    from rnnsearch.tracking.plots import study_plots, to_csv, to_markdown, top_trials

    with tempfile.TemporaryDirectory(prefix="rnnsearch-") as tmp:
        out = Path(tmp)
        if done:
            study_plots(study, out)
        header, rows = top_trials(study, settings.top_trials, run_names)
        (out / "top_trials.csv").write_text(to_csv(header, rows))
        (out / "top_trials.md").write_text(f"# Top {len(rows)} of {len(trials)} trials of `{study.study_name}`\n\n"
                                           + to_markdown(header, rows))
        client.log_artifacts(parent_run_id, tmp)
    client.set_terminated(parent_run_id, status)
