"""Worker processes: two workers share the embedded storage; a dying worker does not end the sweep."""

from __future__ import annotations

import os
import socket
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from rnnsearch.search.objective import TrialObjective
from rnnsearch.search.settings import SweepSettings
from rnnsearch.search.space import parse_space
from rnnsearch.search.study import make_storage, open_study
from rnnsearch.search.workers import (WorkerJob, cpu_count, failure_streak, recover_orphans, resolve_workers,
                                      run_workers)
from test_search_sweep import load, sweep, sweep_cfg


def test_two_workers_share_the_journal_and_run_every_trial_once(tmp_path: Path) -> None:
    summary, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=6", "sweep.workers=2", "sweep.pruner=none"))
    trials = load(tmp_path).trials
    assert len(trials) == 6 and summary["trials"] == 6  # exactly n_trials: no overshoot
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = Counter(t.user_attrs["worker"] for t in trials)
    assert len(workers) == 2, workers  # both processes pulled trials
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)  # ... in processes of their own
    assert trials[0].params["model.hidden_size"] == 8  # the enqueued baseline ran once, as trial 0
    assert sum(t.params["cell.name"] == "lstm" and t.params["model.hidden_size"] == 8
               and t.params["model.num_layers"] == 1 and not t.params["model.bidirectional"]
               and "fixed_params" in t.system_attrs for t in trials) == 1


class CrashOnce(TrialObjective):
    """Kills its own worker process in the first trial it sees (a segfault, an OOM kill)."""

    def __call__(self, trial: optuna.Trial) -> float:
        marker = Path(self.study_name)  # (the test passes a file path as the study name's marker)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        x = trial.suggest_float("x", 0.0, 1.0)
        if not marker.exists():
            marker.write_text("crashed")
            os._exit(9)
        if self.on_start is not None:
            self.on_start()
        return x


@pytest.mark.slow
def test_a_dying_worker_is_replaced_and_its_trial_failed_and_retried(tmp_path: Path) -> None:
    settings = SweepSettings(n_trials=4, pruner="none", sampler="random", max_retry=1)
    storage = str(tmp_path / "crash.journal")
    open_study("crash", make_storage(storage, settings), ["minimize"])
    objective = CrashOnce(base={}, space=parse_space({"x": "interval(0, 1)"}), fixed=[], groups={},
                          objectives=["x"], prune_key="x", study_name=str(tmp_path / "marker"))
    job = WorkerJob(settings=settings, storage=storage, study_name="crash", objective=objective, n_trials=4,
                    start_number=0, epochs=1, max_layers=1)
    logs: list[str] = []
    reason = run_workers(job, [None, None], poll=lambda: None, log=logs.append, poll_seconds=0.2)
    assert reason is None
    trials = load(tmp_path, "crash").trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.FAIL] == 1 and states[TrialState.COMPLETE] == 4
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert failed.user_attrs["reason"].startswith("worker process") and failed.user_attrs["reason"].endswith("died")
    retried = [t for t in trials if t.user_attrs.get("retry_of") == failed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert any("exited with status 9" in line for line in logs)


def test_orphans_of_a_killed_run_are_failed_and_requeued(tmp_path: Path) -> None:
    settings = SweepSettings()
    study = open_study("orphans", make_storage(str(tmp_path / "o.journal"), settings), ["minimize"])
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # no such process
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert recover_orphans(study, max_retry=1) == [trial.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[2].params == {} and study.trials[2].system_attrs["fixed_params"] == trial.params


def _trial(number: int, state: TrialState, reason: str = "") -> optuna.trial.FrozenTrial:
    t = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None,
                                  user_attrs={"reason": reason} if reason else None)
    t.number = number
    return t


def test_failure_streak_counts_this_runs_trials_only() -> None:
    trials = [_trial(0, TrialState.FAIL, "old"), _trial(1, TrialState.FAIL, "old"), _trial(2, TrialState.COMPLETE),
              _trial(3, TrialState.FAIL, "bad lr"), _trial(4, TrialState.FAIL, "bad lr")]
    message = failure_streak(trials, 0, 2)
    assert message is not None and "last 2 trials all failed" in message and "(2x): bad lr" in message
    assert failure_streak(trials, 0, 3) is None  # the complete trial breaks the streak
    assert failure_streak(trials[:2], 2, 2) is None  # an earlier run's failures do not count


def test_auto_workers_one_per_gpu_else_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_workers("auto") == (2, ["3", "5"])
    assert resolve_workers(3) == (3, ["3", "5", "3"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    n, devices = resolve_workers("auto")
    assert n == min(cpu_count(), 8) and devices == [None] * n  # one single-threaded worker per core
