"""The live progress display and the closing report, on hand-made trials (no training)."""

from __future__ import annotations

import io

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from rnnsearch.search.progress import SweepProgress
from rnnsearch.search.report import report, table_rows


def _trials() -> list[optuna.trial.FrozenTrial]:
    dist = {"cell.name": CategoricalDistribution(["rnn", "lstm"])}
    out = []
    for n, (state, value, cell, attrs) in enumerate([
        (TrialState.COMPLETE, 0.05, "lstm", {"epochs": 8, "params": 1200, "run_name": "t000-lstm-1x8"}),
        (TrialState.PRUNED, None, "rnn", {"epochs": 2, "params": 300, "reason": "pruned at epoch 2: val/mse = 0.2"}),
        (TrialState.FAIL, None, "rnn", {"epochs": 0, "reason": "RuntimeError: boom"}),
        (TrialState.COMPLETE, 0.02, "lstm", {"epochs": 8, "params": 1200, "run_name": "t003-lstm-1x8"}),
        (TrialState.RUNNING, None, "rnn", {}),
    ]):
        t = optuna.trial.create_trial(state=state, value=value, params={"cell.name": cell}, distributions=dist,
                                      user_attrs=attrs, intermediate_values={1: 0.3} if state == TrialState.RUNNING
                                      else None)
        t.number = n
        out.append(t)
    return out


def test_plain_progress_prints_one_line_per_finished_trial_with_counts_and_best() -> None:
    out = io.StringIO()
    p = SweepProgress("s", 10, ["best/val/mse"], ["minimize"], 0, 1, mode="plain", stream=out)
    p.start()
    p.update(_trials())
    p.update(_trials())  # nothing new: no new lines
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[1].startswith("trial 1 t001: pruned (pruned at epoch 2") and "[2 epochs]" in lines[1]
    assert "trial 2 t002: FAILED (RuntimeError: boom)" in lines[2]
    assert "[ 3/10] 2 complete, 1 pruned, 1 failed, 1 running | best: best/val/mse=0.02 (t003-lstm-1x8)" in lines[3]


def test_live_progress_renders_without_a_terminal() -> None:
    out = io.StringIO()
    p = SweepProgress("s", 10, ["best/val/mse"], ["minimize"], 0, 2, mode="live", stream=out)
    p.start()
    p.update(_trials())
    p.close()
    text = out.getvalue()
    assert "sweep s" in text and "running, epoch 1" in text and "ETA" in text


def test_report_ranks_complete_trials_and_lists_failures() -> None:
    study = optuna.create_study()
    for t in _trials():
        if t.state != TrialState.RUNNING:
            study.add_trial(t)
    out = io.StringIO()
    best = report(study, ["best/val/mse"], ["minimize"], top=5, stream=out, rich=True)
    assert best is not None and best.value == 0.02
    text = out.getvalue()
    assert "Best 2 trials" in text and "failed: 1x RuntimeError: boom" in text
    header, rows = table_rows([best], ["best/val/mse"])
    assert header == ["#", "run", "best/val/mse", "params", "epochs", "state", "choices"]
    assert rows[0][1:] == ["t003-lstm-1x8", "0.02", "1,200", "8", "complete", "cell=lstm"]


def test_short_names_of_params() -> None:
    from rnnsearch.search.report import choices_text

    assert choices_text({"cell.name": "gru", "model.num_layers": 2, "model.wrappers.0.name": "dropout",
                         "model.wrappers.0.output_keep_prob": 0.81234, "model.layers.1.cell.forget_bias": 1.5,
                         "optim.lr": 0.003}) == (
        "cell=gru num_layers=2 w0=dropout w0.output_keep_prob=0.8123 L1.cell.forget_bias=1.5 lr=0.003")
