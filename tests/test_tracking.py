"""MLflow tracking: a single run and a tiny Optuna sweep logged to a temporary SQLite store.

One store per module (creating one costs ~4 s); the runs are made once by
module-scoped fixtures and checked through ``MlflowClient`` by the tests.
"""

from __future__ import annotations

import io
import time

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rnnsearch.callbacks import Callback
from rnnsearch.cli import CONF_DIR
from rnnsearch.errors import ConfigError
from rnnsearch.tracking import finish_sweep_run, flush, run_label, start_sweep_run, tracking_callbacks
from rnnsearch.tracking.run import classify_abort
from rnnsearch.tracking.settings import choice_params, flatten, tracking_settings
from rnnsearch.train import train

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside MLflow's SQL store
optuna = pytest.importorskip("optuna")

TINY = ["device=cpu", "task.seq_len=8", "task.train_size=96", "task.val_size=32", "task.test_size=32",
        "model.hidden_size=8", "train.epochs=2", "train.batch_size=32"]
STUDY = "tiny-study"


def make_cfg(uri: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, f"tracking.uri={uri}", *overrides])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # artifacts go to ./mlruns, as with MLflow's default store
        yield f"sqlite:///{root}/mlflow.db"


@pytest.fixture(scope="module")
def client(store):
    return mlflow.MlflowClient(store)


@pytest.fixture(scope="module")
def single(store, client):
    """``python -m rnnsearch`` with tiny settings: one run in experiment ``single``."""
    from rnnsearch.cli import run

    cfg = make_cfg(store, "tracking.experiment=single")
    result = run(cfg)
    flush()
    exp = client.get_experiment_by_name("single")
    (found,) = client.search_runs([exp.experiment_id])
    return cfg, result, found


class Scripted(Callback):
    """Ends trial 1 by pruning and trial 2 by an error after the first epoch."""

    def __init__(self, number: int) -> None:
        self.number = number

    def on_epoch_end(self, epoch, metrics):
        if self.number == 1:
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        if self.number == 2:
            raise RuntimeError("boom: scripted failure")


@pytest.fixture(scope="module")
def sweep(store, client):
    """A real 4-trial study: COMPLETE, PRUNED, FAIL, COMPLETE; each trial calls train() with tracking."""
    base = make_cfg(store)
    parent = start_sweep_run(base, STUDY)
    study = optuna.create_study(study_name=STUDY, direction="minimize")
    for cell, layers in [("lstm", 1), ("gru", 1), ("rnn", 1), ("gru", 2)]:
        study.enqueue_trial({"cell": cell, "num_layers": layers})

    def objective(trial):
        params = {"cell": trial.suggest_categorical("cell", ["lstm", "gru", "rnn"]),
                  "num_layers": trial.suggest_int("num_layers", 1, 2)}
        cfg = make_cfg(store, f"cell={params['cell']}", f"model.num_layers={params['num_layers']}")
        callbacks = [*tracking_callbacks(cfg, parent_run_id=parent, run_name=f"t{trial.number:03d}-{run_label(cfg)}",
                                         tags={"study": STUDY, "trial": trial.number}, params=params),
                     Scripted(trial.number)]
        return train(cfg, callbacks)["best/val/mse"]

    study.optimize(objective, n_trials=4, catch=(RuntimeError,))
    finish_sweep_run(base, parent, study)
    exp = client.get_experiment_by_name(STUDY)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return base, parent, study, {int(r.data.tags["trial"]): r for r in children}


# -- pure helpers (no MLflow store) --

def test_flatten_and_choice_params():
    cfg = {"cell": {"name": "lstm", "forget_bias": 1.0}, "optim": {"name": "adam", "lr": 0.003},
           "model": {"hidden_size": 32, "num_layers": 2, "bidirectional": True, "layers": {},
                     "wrappers": [{"name": "dropout", "output_keep_prob": 0.9}, {"name": "residual"}]}}
    flat = flatten(cfg)
    assert flat["model.bidirectional"] == "true" and flat["model.layers"] == "{}"
    assert flat["model.wrappers"] == '[{"name":"dropout","output_keep_prob":0.9},{"name":"residual"}]'
    assert choice_params(cfg, 123) == {"cell": "lstm", "hidden_size": "32", "num_layers": "2", "bidirectional": "true",
                                       "wrappers": "dropout+residual", "optimizer": "adam", "lr": "0.003",
                                       "forget_bias": "1.0", "num_params": "123"}
    assert run_label(cfg) == "lstm-2x32-bi"


def test_settings_off_and_invalid():
    assert tracking_settings({"tracking": {"enabled": False}}) is None
    assert tracking_settings({"cell": {}}) is None
    assert tracking_callbacks({"tracking": {"enabled": False}}) == []
    assert start_sweep_run({"tracking": {"enabled": False}}, "s") is None
    with pytest.raises(ConfigError, match="tracking.urx is not a tracking setting; valid: .*uri"):
        tracking_settings({"tracking": {"urx": "x"}})


def test_abort_classification():
    from rnnsearch.callbacks import TrainingDiverged

    assert classify_abort(optuna.TrialPruned()) == ("KILLED", "PRUNED", None)
    assert classify_abort(optuna.TrialPruned("pruned at epoch 3")) == ("KILLED", "PRUNED", "pruned at epoch 3")
    assert classify_abort(KeyboardInterrupt())[:2] == ("KILLED", "FAIL")
    assert classify_abort(ValueError("bad")) == ("FAILED", "FAIL", "ValueError: bad")
    # The sweep records a diverged trial as pruned; a diverged single run failed.
    assert classify_abort(TrainingDiverged("nan"), trial=True) == ("KILLED", "PRUNED", "diverged: nan")
    assert classify_abort(TrainingDiverged("nan")) == ("FAILED", "FAIL", "TrainingDiverged: nan")


def test_tracking_none_never_imports_mlflow(monkeypatch):
    from omegaconf import OmegaConf

    cfg = {"tracking": OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "tracking" / "none.yaml"))}
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith(("mlflow.", "rnnsearch.tracking."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # any `import mlflow` now raises ImportError
    assert tracking_callbacks(cfg) == [] and start_sweep_run(cfg, "s") is None
    finish_sweep_run(cfg, None, study=None)
    assert not any(m.startswith(("rnnsearch.tracking.run", "rnnsearch.tracking.sweep")) for m in sys.modules)


# -- a single run --

def test_single_run_params_metrics_tags(single, client):
    cfg, result, found = single
    run = client.get_run(found.info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lstm-1x8"
    p = run.data.params
    assert p["model.hidden_size"] == "8" and p["task.seq_len"] == "8" and p["optim.lr"] == "0.003"
    assert (p["cell"], p["hidden_size"], p["num_layers"], p["bidirectional"], p["wrappers"]) == ("lstm", "8", "1",
                                                                                                 "false", "none")
    assert p["num_params"] == str(result["params"])
    assert not any(k.startswith(("tracking.", "hydra.", "sweep.")) for k in p) and len(p) < 60
    for key in ("train/loss", "val/loss", "val/mse", "tokens_per_s", "epoch_seconds"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    m = run.data.metrics
    assert m["best/val/mse"] == pytest.approx(result["best/val/mse"])
    assert m["test/mse"] == pytest.approx(result["test/mse"]) and m["epochs"] == 2
    t = run.data.tags
    assert t["trial_state"] == "COMPLETE" and t["device"] == "cpu" and t["metric"] == "val/mse"
    assert t["compiled"] == "false" and "fused torch.nn path" in t["compile"], "how the cell path ran, and why"
    assert "mlflow.parentRunId" not in t
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_single_run_artifacts_rerun_and_weights(single, client, tmp_path):
    cfg, result, found = single
    rid = found.info.run_id
    assert {a.path for a in client.list_artifacts(rid)} == {"config.yaml", "learning_curve.png", "state_dict.pt"}
    local = Path(client.download_artifacts(rid, "", str(tmp_path)))
    assert (local / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(local / "state_dict.pt", weights_only=True)
    # config.yaml reruns the same run: same config composes from it alone, and gives the same test metric.
    with initialize_config_dir(config_dir=str(local), version_base="1.3"):
        again = compose("config", overrides=["tracking.enabled=false"])
    assert again.model.hidden_size == 8 and again.task.seq_len == 8
    from rnnsearch.model import build_model
    from rnnsearch.tasks import create_task

    task = create_task(again.task)
    model = build_model(again, task.input_size, task.output_size, per_step=task.per_step, token_input=task.token_input)
    model.load_state_dict(state)  # the best-validation weights, loadable without pickle
    assert train(again)["test/mse"] == pytest.approx(result["test/mse"], rel=1e-5)


def test_log_model_flag_and_foreground_mode(store, client):
    cfg = make_cfg(store, "tracking.experiment=log-model", "tracking.log_model=true", "tracking.background=false")
    train(cfg, tracking_callbacks(cfg, run_name="with-model"))
    (run,) = client.search_runs([client.get_experiment_by_name("log-model").experiment_id])
    assert run.info.status == "FINISHED"
    mlflow.set_tracking_uri(store)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert sum(p.numel() for p in model.parameters()) == int(run.data.params["num_params"])


def test_failing_artifact_keeps_status_and_training(store, client, monkeypatch, caplog):
    import rnnsearch.tracking.plots as plots

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "learning_curve", broken)
    cfg = make_cfg(store, "tracking.experiment=broken-artifact", "tracking.background=false")
    result = train(cfg, tracking_callbacks(cfg, run_name="broken"))
    assert result["epochs"] == 2  # training is never stopped by tracking
    (run,) = client.search_runs([client.get_experiment_by_name("broken-artifact").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "COMPLETE"
    assert "ending the MLflow run failed: OSError: disk full" in caplog.text


# -- a sweep: parent run, child runs, statuses --

def test_sweep_parent_and_children(sweep, client):
    base, parent_id, study, children = sweep
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == STUDY
    assert parent.data.tags["rnnsearch.role"] == "sweep" and parent.data.tags["study"] == STUDY
    assert client.get_experiment(parent.info.experiment_id).name == STUDY
    assert sorted(children) == [0, 1, 2, 3]
    for n, run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["study"] == STUDY and run.info.experiment_id == parent.info.experiment_id
    assert children[0].info.run_name == "t000-lstm-1x8" and children[3].info.run_name == "t003-gru-2x8"
    assert children[3].data.params["cell"] == "gru" and children[3].data.params["num_layers"] == "2"


def test_sweep_statuses_follow_trials(sweep, client):
    _, _, study, children = sweep
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert [children[n].info.status for n in range(4)] == ["FINISHED", "KILLED", "FAILED", "FINISHED"]
    assert [children[n].data.tags["trial_state"] for n in range(4)] == ["COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert children[2].data.tags["failure_reason"] == "RuntimeError: boom: scripted failure"
    assert children[1].data.tags["pruned_at_epoch"] == "1" and "failure_reason" not in children[1].data.tags
    assert children[1].data.tags["pruned_reason"] == "pruned at epoch 1"
    # The pruned trial's last epoch is logged too (tracking runs before the pruning callback).
    assert [m.step for m in client.get_metric_history(children[1].info.run_id, "val/mse")] == [1]
    assert {a.path for a in client.list_artifacts(children[1].info.run_id)} == {"config.yaml", "learning_curve.png"}
    assert "state_dict.pt" in {a.path for a in client.list_artifacts(children[3].info.run_id)}


def test_sweep_summary_on_parent(sweep, client, tmp_path):
    _, parent_id, study, children = sweep
    arts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"config.yaml", "top_trials.csv", "top_trials.md", "optimization_history.png",
            "parallel_coordinate.png"} <= arts
    csv = Path(client.download_artifacts(parent_id, "top_trials.csv", str(tmp_path))).read_text().splitlines()
    assert csv[0].startswith("rank,trial,run,value,duration_s,cell,num_layers")
    best = study.best_trial.number
    assert csv[1].startswith(f"1,{best},{children[best].info.run_name},")
    assert len(csv) == 3  # the two complete trials
    values = client.get_metric_history(parent_id, "value")
    assert sorted(m.step for m in values) == [0, 3]
    parent = client.get_run(parent_id)
    assert parent.data.tags["best_trial"] == str(best) and parent.data.metrics["trials/pruned"] == 1


def test_sweep_resume_reuses_parent(sweep, client):
    base, parent_id, study, _ = sweep
    assert start_sweep_run(base, STUDY) == parent_id
    assert client.get_run(parent_id).info.status == "RUNNING"
    finish_sweep_run(base, parent_id, study)
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(parent_id, "value")) == [0, 3]  # not logged twice
    exp = client.get_experiment_by_name(STUDY)
    assert len(client.search_runs([exp.experiment_id], "tags.`rnnsearch.role` = 'sweep'")) == 1


def test_multi_objective_summary(store, client, tmp_path):
    base = make_cfg(store)
    parent = start_sweep_run(base, "tiny-pareto")
    study = optuna.create_study(study_name="tiny-pareto", directions=["minimize", "minimize"])
    dist = {"hidden_size": optuna.distributions.IntDistribution(4, 64)}
    for h, (a, b) in zip([4, 8, 16, 32], [(0.4, 100), (0.2, 300), (0.1, 900), (0.15, 3000)]):
        study.add_trial(optuna.trial.create_trial(params={"hidden_size": h}, distributions=dist, values=[a, b]))
    finish_sweep_run(base, parent, study)
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto_front.png", "top_trials.csv", "top_trials.md"} <= arts
    assert client.get_run(parent).info.status == "FINISHED"


def test_url_passwords_are_masked_in_params():
    from rnnsearch.tracking.settings import flatten

    flat = flatten({"sweep": {"storage": "postgresql://user:s3cret@db:5432/rnn"}, "tracking": {"uri": "sqlite:///m.db"}})
    assert "s3cret" not in flat["sweep.storage"] and flat["sweep.storage"] == "postgresql://user:***@db:5432/rnn"
    assert flat["tracking.uri"] == "sqlite:///m.db"


def _tracked_sweep(store: str, journal: Path, study: str, *extra: str) -> dict:
    from rnnsearch.cli import rewrite_argv
    from rnnsearch.search import run_sweep

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=rewrite_argv([
            "+sweep", *TINY, f"tracking.uri={store}", "sweep.workers=1", "sweep.n_trials=1", "sweep.progress=plain",
            f"sweep.study_name={study}", f"sweep.storage={journal}", "sweep.enqueue=[]", "sweep.best_config=null",
            "sweep.params.model.hidden_size=choice(4,8)", *extra]))
    return run_sweep(cfg, io.StringIO(), cli=[])


def _sweep_parents(client, study: str) -> list:
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], "tags.`rnnsearch.role` = 'sweep'")


def test_a_sweep_that_fails_after_its_trials_still_ends_its_parent_run(store, client, tmp_path):
    # writing the best config into an unwritable place raised after the trials and left the parent RUNNING
    with pytest.raises(OSError):
        _tracked_sweep(store, tmp_path / "s.journal", "ends-parent", "sweep.best_config=/proc/nope/best.yaml")
    (parent,) = _sweep_parents(client, "ends-parent")
    assert parent.info.status == "FAILED"


def test_a_new_study_under_an_old_name_gets_its_own_parent_run(store, client, tmp_path):
    # found by name alone, it joined the old study's parent: old values, old best_run, counts kept at their maximum
    _tracked_sweep(store, tmp_path / "a.journal", "reused-name", "sweep.n_trials=2")
    _tracked_sweep(store, tmp_path / "a.journal", "reused-name", "sweep.n_trials=2")  # a resume: the same parent
    assert len(_sweep_parents(client, "reused-name")) == 1
    _tracked_sweep(store, tmp_path / "b.journal", "reused-name")  # a new study, one trial
    flush()
    parents = sorted(_sweep_parents(client, "reused-name"), key=lambda r: r.info.start_time)
    assert len(parents) == 2 and parents[1].data.metrics["trials/complete"] == 1
    assert parents[0].data.metrics["trials/complete"] == 2
    assert parents[0].data.tags["rnnsearch.study_id"] != parents[1].data.tags["rnnsearch.study_id"]


def test_finishing_a_sweep_ends_the_child_run_of_a_trial_whose_worker_died(store, client):
    # recover_orphans fails such a trial in Optuna, but its MLflow run stayed RUNNING for good
    base = make_cfg(store)
    parent = start_sweep_run(base, "orphans")
    study = optuna.create_study(study_name="orphans")
    dist = {"h": optuna.distributions.IntDistribution(4, 64)}
    study.add_trial(optuna.trial.create_trial(params={"h": 4}, distributions=dist, value=0.5))
    study.add_trial(optuna.trial.create_trial(params={"h": 8}, distributions=dist, state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"reason": "worker process 4242 died"}))
    eid = client.get_run(parent).info.experiment_id
    done, dead = (client.create_run(eid, run_name=f"t00{n}", tags={"mlflow.parentRunId": parent, "trial": str(n)})
                  for n in (0, 1))
    client.set_terminated(done.info.run_id, "FINISHED")
    finish_sweep_run(base, parent, study)
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "FAILED" and dead.data.tags["trial_state"] == "FAIL"
    assert dead.data.tags["failure_reason"] == "worker process 4242 died"
    assert client.get_run(done.info.run_id).info.status == "FINISHED"


def test_a_study_from_before_study_ids_keeps_its_parent_run(store, client):
    # its parent has no id tag: on the first resume with ids it must be adopted, not replaced by a second parent
    base = make_cfg(store)
    old = start_sweep_run(base, "legacy-study")  # as the previous version did: no study id
    assert start_sweep_run(base, "legacy-study", "id-1", adopt_untagged=True) == old
    assert client.get_run(old).data.tags["rnnsearch.study_id"] == "id-1"
    assert start_sweep_run(base, "legacy-study", "id-1") == old  # later resumes find it by its id
    assert start_sweep_run(base, "legacy-study", "id-2") != old  # a new study under that name does not


def test_experiment_results_take_a_study_names_latest_study_only(store, client):
    # two parents for one study name (the first study's storage deleted): the report mixed both studies' trials
    from rnnsearch.experiment.results import load

    eid = client.create_experiment("results-latest")
    children = {}
    for study_id in ("old", "new"):
        parent = client.create_run(eid, run_name="arm", tags={"rnnsearch.role": "sweep", "study": "arm",
                                                              "rnnsearch.study_id": study_id})
        child = client.create_run(eid, run_name="t000", tags={"mlflow.parentRunId": parent.info.run_id,
                                                             "study": "arm", "trial": "0", "metric": "val/mse"})
        children[study_id] = child.info.run_id
        time.sleep(0.01)  # distinct start times
    assert [t.run_id for t in load(store, "results-latest", histories=False)] == [children["new"]]
