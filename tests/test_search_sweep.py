"""End-to-end sweeps in this process: the default sweep shrunk to seconds, pruning, resume, failures, reports.

``sweep_cfg`` composes the real ``conf/`` with ``+sweep`` and shrinks it; the
other ``test_search_*`` files import it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import compose_config
from rnnsearch.cli import rewrite_argv
from rnnsearch.search import SweepFailed, run_sweep

#: Shrinks the default sweep to tiny models on tiny data (a trial takes well under a second).
SHRINK = ["tracking=none", "device=cpu", "sweep.workers=1", "sweep.overrides.task.seq_len=8", "sweep.overrides.task.train_size=128",
          "sweep.overrides.task.val_size=64", "sweep.overrides.task.test_size=64", "sweep.overrides.train.epochs=3",
          "sweep.params.model.hidden_size=choice(4,8)", "sweep.progress=plain",
          "sweep.enqueue=[{cell:{name:lstm},model:{hidden_size:8,num_layers:1,bidirectional:false}}]"]


def sweep_cfg(tmp_path: Path, *overrides: str, sweep: str = "+sweep") -> Any:
    """The default sweep, shrunk, with its storage and best config under ``tmp_path``."""
    return compose_config(rewrite_argv([sweep, *SHRINK, "sweep.study_name=test",
                                        f"sweep.storage={tmp_path}/test.journal",
                                        f"sweep.best_config='{tmp_path}/best_{{study}}.yaml'", *overrides]))


def load(tmp_path: Path, name: str = "test") -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(tmp_path / f"{name}.journal"))))


def sweep(cfg: Any) -> tuple[dict[str, Any], str]:
    out = io.StringIO()
    return run_sweep(cfg, stream=out), out.getvalue()


def test_default_sweep_runs_end_to_end_and_writes_a_rerunnable_best_config(tmp_path: Path) -> None:
    summary, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=5"))
    study = load(tmp_path)
    assert summary["trials"] == 5 == len(study.trials)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert study.trials[0].params == {"cell.name": "lstm", "model.num_layers": 1, "model.bidirectional": False,
                                      "model.hidden_size": 8, **{k: v for k, v in study.trials[0].params.items()
                                                                 if k not in ("cell.name", "model.num_layers",
                                                                              "model.bidirectional",
                                                                              "model.hidden_size")}}
    for t in study.trials:  # conditional params: recorded exactly where they applied
        assert ("cell.forget_bias" in t.params) == (t.params["cell.name"] == "lstm")
        assert ("model.wrappers.0.output_keep_prob" in t.params) == (t.params["model.wrappers.0.name"] == "dropout")
        assert t.user_attrs["epochs"] >= 1 and t.user_attrs["params"] > 0
        assert t.user_attrs["run_name"].startswith(f"t{t.number:03d}-{t.params['cell.name']}-")
    best = yaml.safe_load((tmp_path / "best_test.yaml").read_text())
    assert best["cell"]["name"] == summary["best_params"]["cell.name"] and "sweep" not in best
    assert best["model"]["hidden_size"] == summary["best_params"]["model.hidden_size"]
    assert "Best 5 trials of study test" in text
    assert "--config-name best_test" in text and "python -m rnnsearch cell=" in text
    # the written config composes as a primary config and trains as the trial did
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        again = compose(config_name="best_test")
    from rnnsearch.train import train

    assert train(again)["best/val/mse"] == pytest.approx(summary["best_value"], rel=1e-4)


def test_a_resumed_study_writes_the_best_trial_as_it_trained(tmp_path: Path) -> None:
    # the best config was recomposed from the best params with *today's* settings: after a resume without
    # forget_bias in the space it wrote forget_bias 1.0 (the default); with a new key in the space it crashed
    lstm = ["sweep.params.cell.name=lstm", "sweep.params.cell.forget_bias=interval(0.0,0.1)"]
    first, _ = sweep(sweep_cfg(tmp_path, "sweep.n_trials=2", *lstm))
    best_fb = first["best_params"]["cell.forget_bias"]
    assert first["overrides"] is not None  # nothing changed: the override list is printed as before
    second, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=2", "sweep.params.cell.name=lstm",
                                   "~sweep.params.cell.forget_bias", "sweep.overrides.train.epochs=1",
                                   "+sweep.params.train.grad_clip=choice(0.5,1.0)"))
    assert len(load(tmp_path).trials) == 2  # nothing new ran
    assert f"note: trial {second['best_number']} (the best) ran with other settings" in text
    assert "or as overrides" not in text and second["overrides"] is None
    best = yaml.safe_load((tmp_path / "best_test.yaml").read_text())
    assert best["cell"]["forget_bias"] == pytest.approx(best_fb) and best["train"]["epochs"] == 3
    assert best["train"]["grad_clip"] == 1.0  # the default it trained with, not a value of the new key
    # where a trial logs or which device it used does not change what it trained: no note for those
    third, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=2", *lstm, "device=auto"))  # was cpu
    assert "ran with other settings" not in text and third["overrides"] is not None


def test_pruning_prunes_and_saves_epochs(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=10", "sweep.sampler=random", "sweep.overrides.train.epochs=4",
                    "+sweep.pruner_options.n_startup_trials=2", "+sweep.pruner_options.n_warmup_steps=0")
    summary, text = sweep(cfg)
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert summary["pruned"] == len(pruned) >= 1 and TrialState.COMPLETE in states
    assert all(t.user_attrs["epochs"] < 4 and t.user_attrs["reason"].startswith("pruned at epoch") for t in pruned)
    assert all(len(t.intermediate_values) == t.user_attrs["epochs"] for t in pruned)
    assert "pruned" in text


def test_rerun_resumes_the_same_study(tmp_path: Path) -> None:
    first, _ = sweep(sweep_cfg(tmp_path, "sweep.n_trials=3"))
    before = {t.number: t.datetime_complete for t in load(tmp_path).trials}
    second, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=5"))
    study = load(tmp_path)
    assert len(study.trials) == 5 and second["trials"] == 5
    assert {t.number: t.datetime_complete for t in study.trials[:3]} == before  # not redone
    assert "resuming: 3 already finished" in text
    third, _ = sweep(sweep_cfg(tmp_path, "sweep.n_trials=5"))  # already complete: runs nothing
    assert len(load(tmp_path).trials) == 5
    # Optuna keeps a categorical's choices fixed within a study: refused before any trial, with the way out
    from rnnsearch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sweep.params.model.hidden_size is now 'choice\(4,16\)'.*study_name"):
        sweep(sweep_cfg(tmp_path, "sweep.n_trials=6", "sweep.params.model.hidden_size=choice(4,16)"))
    fourth, _ = sweep(sweep_cfg(tmp_path, "sweep.n_trials=6", "sweep.params.optim.lr=tag(log,interval(1e-4,1e-1))"))
    assert fourth["trials"] == 6  # other bounds of a float are fine


def test_failing_trials_are_recorded_and_max_failures_stops_the_sweep(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=10", "sweep.max_failures=3", "sweep.overrides.train.batch_size=0")
    with pytest.raises(SweepFailed, match=r"last 3 trials all failed.*train.batch_size must be a positive integer"):
        sweep(cfg)
    study = load(tmp_path)
    assert len(study.trials) == 3 and all(t.state == TrialState.FAIL for t in study.trials)
    assert "batch_size" in study.trials[0].user_attrs["reason"]


def test_divergence_and_budget_prune_other_errors_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from rnnsearch.callbacks import TrainingDiverged

    module = importlib.import_module("rnnsearch.train")
    real_train = module.train
    calls = iter([TrainingDiverged("loss is nan"), RuntimeError("boom")])

    def fake_train(cfg: Any, callbacks: Any = ()) -> dict:
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return real_train(cfg, callbacks)

    monkeypatch.setattr(module, "train", fake_train)
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=4", "sweep.max_params=400", "sweep.enqueue=[]",
                    "sweep.params.cell.name=choice(rnn)", "sweep.params.model.num_layers=1",
                    "sweep.params.model.bidirectional=false", "sweep.params.model.hidden_size=choice(4,16)")
    summary, text = sweep(cfg)
    trials = load(tmp_path).trials
    reasons = [str(t.user_attrs.get("reason", "")) for t in trials]
    rejected = [t for t, r in zip(trials, reasons) if r.startswith("rejected")]
    diverged = [t for t, r in zip(trials, reasons) if r.startswith("diverged")]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.state == TrialState.PRUNED and t.user_attrs["params"] > 400 for t in rejected)
    assert all(t.params["model.hidden_size"] == 16 for t in rejected)
    assert len(diverged) == 1 and diverged[0].state == TrialState.PRUNED
    assert len(failed) == 1 and failed[0].user_attrs["reason"] == "RuntimeError: boom"
    assert summary["trials"] == 4 and "failed: 1x RuntimeError: boom" in text


def test_multi_objective_sweep_reports_the_pareto_front(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=4", "sweep.objectives=[best/val/mse,params]", "sweep.sampler=nsga2")
    summary, text = sweep(cfg)
    study = load(tmp_path)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert "Pareto front of study test" in text and "pruner none (multi-objective)" in text
    assert isinstance(summary["best_value"], list) and len(summary["best_value"]) == 2
    assert all(t.state == TrialState.COMPLETE for t in study.trials)  # no pruning with two objectives


def test_grid_sampler_stops_when_the_grid_is_exhausted(tmp_path: Path) -> None:
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=20", "sweep.sampler=grid", "sweep.enqueue=[]", "sweep.pruner=none")
    cfg.sweep.params = {"cell": {"name": "choice(rnn, gru)"}, "model": {"hidden_size": "choice(4, 8)"}}
    summary, _ = sweep(cfg)
    study = load(tmp_path)
    assert len(study.trials) == 4
    assert sorted((t.params["cell.name"], t.params["model.hidden_size"]) for t in study.trials) == [
        ("gru", 4), ("gru", 8), ("rnn", 4), ("rnn", 8)]


def test_grid_on_a_conditional_space_trains_each_composition_once(tmp_path: Path) -> None:
    # forget_bias applies to lstm only: the grid points (gru, 0.0) and (gru, 1.0) are one model, trained twice before
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=20", "sweep.sampler=grid", "sweep.enqueue=[]", "sweep.pruner=none")
    cfg.sweep.params = {"cell": {"name": "choice(lstm, gru)", "forget_bias": "choice(0.0, 1.0)"},
                        "model": {"hidden_size": 4}}
    summary, _ = sweep(cfg)
    trials = load(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == 4 and len(complete) == 3
    assert sorted(map(str, (t.params for t in complete))) == sorted(map(str, [
        {"cell.name": "gru"}, {"cell.name": "lstm", "cell.forget_bias": 0.0},
        {"cell.name": "lstm", "cell.forget_bias": 1.0}]))
    (dup,) = [t for t in trials if t.state == TrialState.PRUNED]
    assert dup.params == {"cell.name": "gru"} and dup.user_attrs["reason"].startswith("rejected: duplicate of trial")


def test_grid_with_an_enqueued_point_still_visits_every_point(tmp_path: Path) -> None:
    # GridSampler does not mark an enqueued trial's point visited, and the cap at the grid's size left one unrun
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=10", "sweep.sampler=grid", "sweep.pruner=none",
                    "sweep.enqueue=[{model:{hidden_size:4}}]")
    cfg.sweep.params = {"model": {"hidden_size": "choice(4, 8)"}}
    sweep(cfg)
    trials = load(tmp_path).trials
    assert sorted(t.params["model.hidden_size"] for t in trials if t.state == TrialState.COMPLETE) == [4, 8]


def test_grid_points_run_once_each_with_parallel_workers_and_on_resume(tmp_path: Path) -> None:
    # GridSampler gives trial n the n-th point of its seeded shuffle of the grid: with a different seed per
    # worker (as the other samplers get), two workers starting together ran one point twice.
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=3", "sweep.sampler=grid", "sweep.enqueue=[]", "sweep.pruner=none",
                    "sweep.workers=2")
    cfg.sweep.params = {"seed": "range(0, 4)"}
    sweep(cfg)
    first = [t.params["seed"] for t in load(tmp_path).trials]
    assert len(first) == 3 and len(set(first)) == 3, first
    cfg.sweep.n_trials = 10  # resuming runs the one missing point, then the grid is exhausted
    sweep(cfg)
    study = load(tmp_path)
    assert sorted(t.params["seed"] for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_random_search_draws_depend_on_the_trial_number_not_on_the_workers(tmp_path: Path) -> None:
    params = {"model": {"hidden_size": "range(4, 64)"}, "optim": {"lr": "tag(log, interval(1e-4, 1e-1))"}}
    drawn = []
    for name, workers in (("a", 2), ("b", 1)):
        cfg = sweep_cfg(tmp_path, "sweep.n_trials=3", "sweep.sampler=random", "sweep.enqueue=[]", "sweep.pruner=none",
                        f"sweep.workers={workers}", f"sweep.study_name={name}", f"sweep.storage={tmp_path}/{name}.journal")
        cfg.sweep.params = params
        sweep(cfg)
        drawn.append({t.number: t.params for t in load(tmp_path, name).trials})
    assert drawn[0] == drawn[1]  # the same draw for trial n, with 2 workers or 1: paired across studies
    assert len({p["optim.lr"] for p in drawn[0].values()}) == 3


def test_bad_sweep_settings_fail_before_any_trial(tmp_path: Path) -> None:
    from rnnsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="valid choices: hyperband, median, none, successive_halving"):
        sweep(sweep_cfg(tmp_path, "sweep.pruner=asha"))
    # an objective no trial returns was found only after each trial had trained
    with pytest.raises(ConfigError, match=r"sweep.objectives \['best/val/accuracy'\] are not results .*'adding'; "
                                          r"valid objectives there: .*best/val/mse.*test/mse"):
        sweep(sweep_cfg(tmp_path, "sweep.objectives=[best/val/accuracy]", "sweep.directions=[maximize]"))
    # a name no registry has failed trial after trial instead
    with pytest.raises(ConfigError, match=r"Unknown cell.name in sweep.params 'foo'; valid choices: .*gru.*lstm"):
        sweep(sweep_cfg(tmp_path, "sweep.params.cell.name=choice(lstm,foo)"))
    with pytest.raises(ConfigError, match=r"Unknown model.wrappers.0.name in sweep.params 'drop'; .*dropout.*none"):
        sweep(sweep_cfg(tmp_path, "sweep.params.model.wrappers.0.name=choice(none,drop)"))
    # these were raw tracebacks (the sampler and pruner were only built inside the workers)
    with pytest.raises(ConfigError, match="sweep.pruner_options for pruner 'median'.*n_startup_trials"):
        sweep(sweep_cfg(tmp_path, "+sweep.pruner_options.n_startup_trials=-1"))
    with pytest.raises(ConfigError, match="sweep.sampler_options for sampler 'tpe'.*foo"):  # before workers start
        sweep(sweep_cfg(tmp_path, "+sweep.sampler_options.foo=1", "sweep.workers=2"))
    with pytest.raises(ConfigError, match=f"sweep.storage='{tmp_path}' cannot be used as a journal file"):
        sweep(sweep_cfg(tmp_path, f"sweep.storage={tmp_path}"))
    with pytest.raises(ConfigError, match="sweep.storage='bogus://x' cannot be opened"):
        sweep(sweep_cfg(tmp_path, "sweep.storage=bogus://x"))
    assert not (tmp_path / "test.journal").exists() or not load(tmp_path).trials



def test_the_documented_unsearch_command_runs_its_enqueued_baseline_without_that_key(tmp_path: Path) -> None:
    # `python -m rnnsearch +sweep '~sweep.params.cell.forget_bias'` (docs/sweeps.md) stopped with an error, as the
    # default enqueue entry sets cell.forget_bias
    _, text = sweep(sweep_cfg(tmp_path, "sweep.n_trials=1", "~sweep.params.cell.forget_bias",
                              "sweep.enqueue=[{cell:{name:lstm,forget_bias:1.0},model:{hidden_size:8}}]"))
    assert "note: sweep.enqueue entry 0: cell.forget_bias not searched by sweep.params" in text
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.COMPLETE and "cell.forget_bias" not in trial.params
    assert trial.params["model.hidden_size"] == 8 and trial.params["cell.name"] == "lstm"  # the rest of the entry


def test_an_enqueued_value_off_a_range_step_is_outside_the_space() -> None:
    from optuna.distributions import FloatDistribution, IntDistribution

    from rnnsearch.search.run import _in_space

    ints = IntDistribution(32, 128, step=32)
    assert _in_space(ints, 64) and _in_space(ints, 128) and not _in_space(ints, 48) and not _in_space(ints, 160)
    floats = FloatDistribution(0.0, 1.0, step=0.1)
    assert _in_space(floats, 0.3) and not _in_space(floats, 0.25)
    assert _in_space(FloatDistribution(1e-4, 1e-1, log=True), 3e-3)


def test_a_causal_task_never_samples_a_bidirectional_model(tmp_path: Path) -> None:
    """arithmetic's targets are the next steps' inputs: a bidirectional trial would read the answers."""
    from rnnsearch.errors import ConfigError

    task = ["task=arithmetic", "~sweep.overrides.task.seq_len", "+sweep.overrides.task.max_digits=1", "+sweep.overrides.task.max_distractors=0",
            "sweep.n_trials=4", "sweep.sampler=random", "sweep.pruner=none",
            "sweep.params.model.bidirectional=choice(false,true)"]
    _, text = sweep(sweep_cfg(tmp_path, *task))
    assert "model.bidirectional is searched over [False] only" in text
    trials = load(tmp_path).trials
    assert len(trials) == 4 and all(t.params.get("model.bidirectional") is False for t in trials)
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get("reason") for t in trials]
    with pytest.raises(ConfigError, match="model.bidirectional=true cannot be used with task 'arithmetic'"):
        sweep(sweep_cfg(tmp_path / "fixed", *task[:-1], "~sweep.params.model.bidirectional",
                        "+sweep.overrides.model.bidirectional=true"))


def test_the_pruner_watches_the_objective_not_the_task_metric(tmp_path: Path) -> None:
    """tagging's headline metric is accuracy (max); a sweep minimising val/loss must report val/loss."""
    from rnnsearch.search.objective import pruning_key

    assert [pruning_key(k) for k in ("best/val/accuracy", "val/loss", "train/loss", "params", "test/loss")] == \
        ["val/accuracy", "val/loss", "train/loss", None, None]
    tagging = ["task=tagging", "+sweep.overrides.task.min_len=5", "sweep.n_trials=3", "sweep.sampler=random"]
    _, text = sweep(sweep_cfg(tmp_path, *tagging, "sweep.objectives=[val/loss]"))
    assert "pruner median; objective val/loss (min)" in text
    done = [t for t in load(tmp_path).trials if t.state == TrialState.COMPLETE]
    assert done and all(t.intermediate_values[t.user_attrs["epochs"]] == t.user_attrs["metrics"]["val/loss"]
                        for t in done)
    _, text = sweep(sweep_cfg(tmp_path / "params", *tagging, "sweep.objectives=[params]"))
    assert "pruner none (params has no per-epoch value)" in text
    assert all(not t.intermediate_values for t in load(tmp_path / "params").trials)


def test_objectives_are_checked_on_every_task_the_space_can_pick(tmp_path: Path) -> None:
    from rnnsearch.errors import ConfigError

    tasks = ["~sweep.overrides.task.seq_len", "+sweep.params.task.name=choice(adding,copy)"]
    with pytest.raises(ConfigError, match=r"\['best/val/mse'\] are not results of a trial on task 'copy'"):
        sweep(sweep_cfg(tmp_path, *tasks, "sweep.objectives=[best/val/mse]"))
    # an objective both tasks return passes the check (it refused any objective but the base task's before);
    # max_params rejects every trial before training, so nothing trains here
    summary, _ = sweep(sweep_cfg(tmp_path, *tasks, "sweep.objectives=[val/loss]", "sweep.n_trials=2",
                                 "sweep.max_params=1"))
    assert summary["pruned"] == 2
