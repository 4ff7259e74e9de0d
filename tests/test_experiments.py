"""Experiments (``+experiment=NAME``): every shipped experiment composes in both settings and runs a two-trial
smoke version end to end (CLI subprocess → MLflow → ``scripts/experiment_report.py``); the settings, the arms,
the grid queue and the result tables are checked on their own."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import REPO, compose_config, run_cli
from rnnsearch.errors import ConfigError
from rnnsearch.experiment.results import Trial, arm_table, importances, variant_table
from rnnsearch.experiment.run import arm_config
from rnnsearch.experiment.settings import ExperimentSettings

EXPERIMENTS = sorted(p.parent.name for p in (REPO / "experiments").glob("*/config.yaml"))

#: Per experiment: one arm and the overrides that shrink it to a few seconds.
SMOKE = {
    "long_lags": ["experiment.only=[lstm-T50]", "task.seq_len=12"],
    "forget_bias": ["experiment.only=[copy-lstm_fb0]", "experiment.budgets.small.copy_delay=5"],
    "lstm_odyssey": ["experiment.only=[digits-NFG]", "experiment.budgets.small.digits_mode=row"],
}
TINY = ["sweep.n_trials=2", "sweep.workers=2", "train.epochs=1", "task.train_size=64", "task.val_size=32",
        "task.test_size=32", "device=cpu"]


def test_every_experiment_has_a_config_link_and_a_readme():
    assert EXPERIMENTS == ["forget_bias", "long_lags", "lstm_odyssey"]
    for name in EXPERIMENTS:
        link = REPO / "conf" / "experiment" / f"{name}.yaml"
        assert link.resolve() == (REPO / "experiments" / name / "config.yaml").resolve(), name
        readme = (REPO / "experiments" / name / "README.md").read_text()
        assert f"python -m rnnsearch +experiment={name}" in readme
        assert "<!-- results:small:begin -->" in readme and "<!-- results:small:end -->" in readme


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("setting", ["small", "full"])
def test_experiment_composes_in_both_settings(name, setting):
    GlobalHydra.instance().clear()
    cfg = compose_config([f"+experiment={name}", f"experiment.setting={setting}"])
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = ExperimentSettings.from_config(container["experiment"])
    arms = settings.arms()
    assert len(arms) == math.prod(len(v) for v in settings.factors.values())
    assert len({a.name for a in arms}) == len(arms)
    sweep = container["sweep"]
    assert sweep["workers"] == "auto" and isinstance(sweep["n_trials"], int) and sweep["n_trials"] >= 2
    assert sweep["pruner"] == "none"  # every trial trains its whole budget: the comparisons need that
    for arm in arms:
        arm_cfg = arm_config(container, settings, arm)
        assert arm_cfg["sweep"]["study_name"] == f"{name}-{setting}-{arm.name}"
        assert "experiment" not in arm_cfg
        assert arm_cfg["tracking"]["sweep_experiment"] == f"{name}-{setting}"
        assert arm_cfg["tracking"]["sweep_tags"]["arm"] == arm.name
        assert "${" not in repr(arm_cfg)  # every interpolation resolved


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_two_trial_smoke_run_and_report(name, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = run_cli([f"+experiment={name}", *SMOKE[name], *TINY, f"tracking.uri={uri}", "tracking.log_weights=false",
                   "tracking.log_curve=false"], tmp_path, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"experiment {name} (small): 1 arm(s)" in res.stdout
    assert (tmp_path / f"{name}-small.journal").exists()
    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_report.py"), name, "--uri", uri,
                          "--out", str(out), "--no-readme"], cwd=tmp_path, text=True, capture_output=True,
                         timeout=200)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (out / "results-small.md").read_text()
    assert f"MLflow experiment `{name}-small`" in md and "2 trial runs in 1 arms" in md
    assert "| 2/2 |" in md  # both trials complete, in the arm table
    pngs = sorted(out.glob("small-*.png"))
    assert pngs and all(p.stat().st_size > 5000 for p in pngs)
    if name != "lstm_odyssey":  # seeds are the grid: the two trials ran two different seeds, not one seed twice
        import mlflow

        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=[f"{name}-small"])
        seeds = sorted(runs["params.seed"].dropna())
        assert len(set(seeds)) == 2 and set(seeds) <= {str(i) for i in range(10)}, seeds


def test_report_errors_name_the_valid_choices(tmp_path):
    rep = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_report.py"), "nope",
                          "--uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, text=True, capture_output=True,
                         timeout=120)
    assert rep.returncode == 2 and "Traceback" not in rep.stderr
    assert "'nope'" in rep.stderr and "long_lags" in rep.stderr and "lstm_odyssey" in rep.stderr
    rep = subprocess.run([sys.executable, str(REPO / "scripts" / "experiment_report.py"), "long_lags",
                          "--uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path, text=True, capture_output=True,
                         timeout=120)
    assert rep.returncode == 2 and "No MLflow experiment 'long_lags-small'" in rep.stderr


# -- settings and arms ---------------------------------------------------------------------------------------

FACTORS = {"cell": {"rnn": {"cell": {"name": "rnn"}}, "gru": {"cell": {"name": "gru"}}},
           "length": {"T5": {"task": {"seq_len": 5}}, "T9": {"task": {"seq_len": 9, "seed": 3}}}}


def _settings(**kw) -> ExperimentSettings:
    return ExperimentSettings.from_config({"name": "x", "budgets": {"small": {}, "full": {}}, "factors": FACTORS,
                                           **kw})


def test_arms_are_the_product_of_the_factors_in_order():
    arms = _settings().arms()
    assert [a.name for a in arms] == ["rnn-T5", "rnn-T9", "gru-T5", "gru-T9"]
    assert arms[3].overrides == {"cell": {"name": "gru"}, "task": {"seq_len": 9, "seed": 3}}
    assert arms[1].levels == {"cell": "rnn", "length": "T9"}


def test_only_picks_arms_by_name_or_by_level():
    assert [a.name for a in _settings(only=["gru-T9"]).arms()] == ["gru-T9"]
    assert [a.name for a in _settings(only="T5").arms()] == ["rnn-T5", "gru-T5"]
    with pytest.raises(ConfigError, match=r"experiment.only entry 'lstm'.*valid choices: .*gru-T5"):
        _settings(only=["lstm"])


@pytest.mark.parametrize("kw, match", [
    ({"setting": "medium"}, r"Unknown experiment.setting 'medium'; valid choices: full, small"),
    ({"colour": 1}, r"Unknown experiment setting\(s\) \['colour'\]; valid settings: name, title, setting"),
    ({"factors": {}}, r"experiment.factors must map each factor"),
    ({"factors": {"cell": {"a b": {}}}}, r"level 'a b'"),
    ({"factors": {"cell": {"rnn": 3}}}, r"experiment.factors.cell.rnn must be a mapping"),
    ({"name": "x y"}, r"experiment.name must be letters"),
])
def test_bad_experiment_settings_are_one_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        _settings(**kw)


def test_bad_setting_on_the_command_line_exits_2_naming_the_choices(tmp_path):
    res = run_cli(["+experiment=long_lags", "experiment.setting=huge", "tracking=none"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Unknown experiment.setting 'huge'; valid choices: full, small" in res.stderr


def test_an_arm_whose_task_cannot_run_stops_the_experiment_before_any_trial(monkeypatch):
    from rnnsearch.experiment.run import _check_tasks
    from rnnsearch.tasks.chorales import ChoralesTask

    def missing() -> None:
        raise ConfigError("task=chorales needs music21 (...). Install the extra: pip install 'rnnsearch[music]'.")

    monkeypatch.setattr(ChoralesTask, "check_available", classmethod(lambda cls: missing()))
    s = ExperimentSettings.from_config({"name": "x", "budgets": {"small": {}}, "factors": {"task": {
        "digits": {"task": {"name": "digits"}}, "chorales": {"task": {"name": "chorales"}}}}})
    with pytest.raises(ConfigError, match=r"arm chorales: task=chorales needs music21.*experiment.only"):
        _check_tasks({"task": {"name": "adding"}, "sweep": {}}, s.arms())
    _check_tasks({"task": {"name": "adding"}, "sweep": {}}, s.arms()[:1])  # the digits arm alone is fine


def test_command_line_keys_that_cancel_a_factor_or_change_the_trials_are_noted():
    from rnnsearch.experiment.run import _override_notes

    notes = _override_notes(["task.seq_len=100", "sweep.workers=2", "tracking=none", "train.epochs=3"], _settings())
    assert len(notes) == 2
    assert "task.seq_len=100 overrides what factor 'length' sets per arm" in notes[0]
    assert "train.epochs=3 changes the trials of x-small" in notes[1]


def test_arm_config_merges_levels_into_sweep_overrides_and_tags_the_parent():
    s = _settings()
    arm = s.arms()[3]
    cfg = arm_config({"experiment": {}, "sweep": {"overrides": {"task": {"seq_len": 50, "train_size": 7}}},
                      "tracking": {"enabled": True}}, s, arm)
    assert cfg["sweep"]["overrides"] == {"task": {"seq_len": 9, "train_size": 7, "seed": 3},
                                         "cell": {"name": "gru"}}
    assert cfg["sweep"]["study_name"] == "x-small-gru-T9"
    assert cfg["tracking"]["sweep_tags"] == {"experiment": "x", "setting": "small", "arm": "gru-T9",
                                             "level.cell": "gru", "level.length": "T9"}
    off = arm_config({"sweep": {}, "tracking": {"enabled": False}}, s, arm)
    assert "sweep_experiment" not in off["tracking"]


# -- result tables -------------------------------------------------------------------------------------------

def _trial(arm: str, levels: dict, test: float, curve: list[float], state: str = "COMPLETE", **params) -> Trial:
    return Trial(run_id=f"r{arm}{test}", study=f"x-small-{arm}", arm=arm, levels=levels, state=state,
                 params={k: str(v) for k, v in params.items()},
                 metrics={"test/mse": test, "best/val/mse": min(curve), "solved": float(test < 0.01)},
                 tags={"metric": "val/mse", "direction": "minimize", "baseline": "0.1667", "solved_at": "0.01"},
                 history={"val/mse": list(enumerate(curve, 1)), "epoch_seconds": [(e, 2.0) for e in
                                                                                   range(1, len(curve) + 1)]})


def test_time_to_solve_and_the_arm_table():
    a = _trial("gru", {"cell": "gru"}, 0.001, [0.2, 0.05, 0.005, 0.002])
    b = _trial("gru", {"cell": "gru"}, 0.004, [0.2, 0.009, 0.004, 0.003])
    c = _trial("rnn", {"cell": "rnn"}, 0.16, [0.17, 0.16, 0.165, 0.16])
    d = _trial("rnn", {"cell": "rnn"}, math.nan, [0.2], state="PRUNED")
    assert a.time_to_solve() == (3, 6.0) and b.time_to_solve() == (2, 4.0) and c.time_to_solve() is None
    header, rows = arm_table([a, b, c, d], ["cell"])
    assert header[:4] == ["cell", "trials", "solved (test)", "median test"]
    assert rows[0] == ["gru", "2/2", "2/2", "0.0025 mse", "0.001", "0.1667", "2.5 (2)", "5 (2)"]
    assert rows[1][:3] == ["rnn", "1/2", "0/2"] and rows[1][-2:] == ["–", "–"]  # the diverged trial is not solved


def test_time_to_solve_reads_the_logged_epochs_not_list_positions():
    t = _trial("gru", {"cell": "gru"}, 0.001, [0.2])
    t.history = {"val/mse": [(1, 0.2), (3, 0.005)], "epoch_seconds": [(1, 2.0), (2, 2.5), (3, 3.0), (4, 9.0)]}
    assert t.time_to_solve() == (3, 7.5)


def test_variant_table_tests_each_level_against_the_reference():
    trials = [_trial(v, {"task": "t", "variant": v}, x, [x])
              for v, xs in {"vanilla": [0.10, 0.11, 0.12, 0.10], "NFG": [0.30, 0.32, 0.31, 0.29],
                            "NP": [0.11, 0.10, 0.12, 0.11]}.items() for x in xs]
    _, rows = variant_table(trials, "variant", "vanilla", ["task"])
    verdict = {r[1]: r[-1] for r in rows}
    assert verdict == {"vanilla": "reference", "NFG": "worse", "NP": "n.s."}
    raw, holm = {r[1]: r[-3] for r in rows}, {r[1]: r[-2] for r in rows}
    assert float(holm["NFG"]) >= float(raw["NFG"]) and raw["vanilla"] == "–"


def test_paired_test_matches_trial_numbers():
    base = [0.1, 0.5, 0.9, 0.3]
    trials = []
    for v, shift in (("vanilla", [0, 0, 0, 0]), ("NP", [0.010, 0.012, 0.011, 0.009])):
        for n, (x, d) in enumerate(zip(base, shift)):
            t = _trial(v, {"variant": v}, x + d, [x + d])
            t.tags["trial"] = str(n)
            trials.append(t)
    welch = {r[0]: r[-1] for r in variant_table(trials, "variant", "vanilla")[1]}
    paired = {r[0]: r[-1] for r in variant_table(trials, "variant", "vanilla", paired=True)[1]}
    assert welch["NP"] == "n.s." and paired["NP"] == "worse"  # a small, consistent difference per draw


def test_holm_correction():
    from rnnsearch.experiment.results import holm_correct

    assert holm_correct({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm_correct({"a": 0.6, "b": 0.9}) == {"a": 1.0, "b": 1.0}


def test_importances_find_the_param_that_matters():
    import random

    rng = random.Random(0)
    trials = []
    for i in range(40):
        lr, h = 10 ** rng.uniform(-4, -1), rng.randrange(16, 129)
        trials.append(_trial("a", {"variant": "vanilla" if i % 2 else "NP"}, 0.1, [abs(math.log10(lr) + 2.5)],
                             **{"optim.lr": lr, "model.hidden_size": h}))
    imp = importances(trials, {"optim.lr": "tag(log, interval(1e-4, 1e-1))", "model.hidden_size": "range(16, 129)"},
                      factor="variant")
    assert set(imp) == {"fANOVA", "PED-ANOVA"}
    for ev, values in imp.items():
        assert max(values, key=values.get) == "optim.lr", (ev, values)
        assert set(values) == {"optim.lr", "model.hidden_size", "variant"}
