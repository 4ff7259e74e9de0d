"""The sweep through the real command line: bare ``+sweep`` in a subprocess, then the best config reruns."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

ENV = {"OMP_NUM_THREADS": "1"}

SHRINK_CLI = ["tracking=none", "device=cpu", "sweep.n_trials=3", "sweep.workers=1",
              "task.seq_len=8", "task.train_size=128", "task.val_size=64", "task.test_size=64",  # beat sweep.overrides
              "train.epochs=2",
              "sweep.params.model.hidden_size=choice(4,8)",  # unquoted: the CLI quotes search spaces for Hydra
              "sweep.params.model.num_layers=1", "sweep.enqueue=[]"]


def _sweep(tmp_path: Path) -> str:
    done = run_cli(["+sweep", *SHRINK_CLI], tmp_path, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bare_plus_sweep_runs_the_default_sweep(tmp_path: Path) -> None:
    out = _sweep(tmp_path)
    assert "sweep default-adding: 3 trials" in out and "storage: " in out
    assert (tmp_path / "default-adding.journal").exists() and (tmp_path / "best_default-adding.yaml").exists()
    assert "python -m rnnsearch --config-dir . --config-name best_default-adding" in out
    assert "note: your command line overrides sweep.overrides task.seq_len=20, task.train_size=1000" in out
    assert "[3/3] " in out and "0 failed" in out


@pytest.mark.slow
def test_the_best_config_reruns_with_the_printed_commands(tmp_path: Path) -> None:
    out = _sweep(tmp_path)
    again = run_cli(["--config-dir", ".", "--config-name", "best_default-adding", "train.epochs=1"], tmp_path,
                    env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "best/val/mse" in again.stdout
    overrides = out.split("or as overrides:\n  python -m rnnsearch ")[1].splitlines()[0].split()
    assert "tracking=none" in overrides
    same = run_cli([*overrides, "train.epochs=1"], tmp_path, env=ENV, timeout=300)
    assert same.returncode == 0, same.stderr[-3000:]
    assert same.stdout.split("params")[1].split()[0] == again.stdout.split("params")[1].split()[0]
