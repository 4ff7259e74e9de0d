"""The command line: a tiny training run end to end in a subprocess, ``--cfg job``, ``--help``,
and every kind of bad input → exit status 2 with one paragraph naming the value and the valid
choices, no traceback, before any training. The bad inputs run in-process through
:func:`rnnsearch.cli.main` (the same code path, without paying an interpreter start each);
the ``slow`` variant repeats them all in subprocesses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF_DIR, TINY
from rnnsearch import cli

#: In-process runs leave logging and the output folder alone.
QUIET = ["hydra/job_logging=none", "hydra/hydra_logging=none", "hydra.output_subdir=null", "hydra.run.dir=."]


@pytest.fixture
def run_main(in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``run_main(*args) -> (exit status, stdout, stderr)`` of ``rnnsearch.cli.main`` in this process."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def _run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["rnnsearch"])
        code = 0
        try:
            cli.main([*args, *QUIET])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def test_train_end_to_end_in_a_subprocess(cli):
    res = cli(*TINY, "cell=gru", "model.num_layers=2", "model.bidirectional=true")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "epoch   1/1" in out and "train/loss" in out and "val/mse" in out, out
    assert "final metrics" in out and "test/mse" in out and "best_epoch" in out
    assert "fused torch.nn path" in out  # a plain GRU stack runs fused
    assert "Traceback" not in res.stderr


def test_cfg_job_prints_the_composed_config(run_main):
    code, out, err = run_main("--cfg", "job", "cell=gru", "model.num_layers=3", "model.bidirectional=true",
                              "model.hidden_size=64", "cell.reset_after=false")
    assert code == 0, err
    cfg = OmegaConf.create(out)
    assert cfg.cell.name == "gru" and cfg.cell.reset_after is False
    assert cfg.model.num_layers == 3 and cfg.model.bidirectional is True and cfg.model.hidden_size == 64
    assert cfg.task.name == "adding" and "final metrics" not in out


def test_cfg_job_accepts_the_documented_overrides(run_main):
    code, out, err = run_main("--cfg", "job", "cell=lstm", "cell.forget_bias=0.0", "cell.use_peepholes=true",
                              "model.wrappers=[{name: dropout, output_keep_prob: 0.8}]",
                              "model.num_layers=3", "model.layers={2: {cell: {name: gru}}}")
    assert code == 0, err
    cfg = OmegaConf.create(out)
    assert cfg.cell.forget_bias == 0.0 and cfg.cell.use_peepholes is True
    assert OmegaConf.to_container(cfg.model.wrappers) == [{"name": "dropout", "output_keep_prob": 0.8}]
    assert cfg.model.layers[2].cell.name == "gru"


def test_help_lists_the_config_groups(run_main):
    code, out, err = run_main("--help")
    assert code == 0, err
    for group in ("cell", "model", "task", "optim"):
        files = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(files)}" in out, out
    assert "python -m rnnsearch" in out


BAD_INPUTS = [
    (["cell=foo"], ["'foo'", "gru, ln_lstm, lstm, rnn"]),
    (["cell.name=foo"], ["'foo'", "gru, ln_lstm, lstm, rnn"]),
    (["task=nope"], ["'nope'", "adding"]),
    (["task.name=nope"], ["'nope'", "adding"]),
    (["optim=nope"], ["'nope'", "adam", "sgd"]),
    (["model.wrappers=[{name: nope}]"], ["'nope'", "dropout, residual, zoneout"]),
    (["+cell.bogus=1"], ["'bogus'", "forget_bias", "use_peepholes"]),
    (["model.hidden_size=0"], ["model.hidden_size", "positive integer", "0"]),
    (["model.hidden_size=-8"], ["model.hidden_size", "-8"]),
    (["model.num_layers=0"], ["model.num_layers", "positive integer", "0"]),
    (["task.seq_len=0"], ["task.seq_len", "0"]),
    (["model.wrappers=[{name: dropout, output_keep_prob: 1.5}]"], ["output_keep_prob", "(0, 1]", "1.5"]),
    (["model.wrappers=[{name: dropout, input_keep_prob: 0}]"], ["input_keep_prob", "(0, 1]", "0"]),
    (["model.wrappers=[{name: dropout, state_keep_prob: -0.2}]"], ["state_keep_prob", "-0.2"]),
    (["cell.forget_bias=nan"], ["forget_bias", "finite", "nan"]),
    (["cell.forget_bias=-inf"], ["forget_bias", "finite", "-inf"]),
    (["cell=ln_lstm", "cell.forget_bias=inf"], ["forget_bias", "inf"]),
    (["cell.use_peepholes=true", "model.fused=always"], ["model.fused=always", "use_peepholes", "auto", "never"]),
    (["model.fused=sometimes"], ["'sometimes'", "always, auto, never"]),
    (["model.merge_mode=max"], ["'max'", "ave, concat, mul, sum"]),
    (["optim.lr=-1"], ["optim.lr", "-1"]),
    (["device=tpu"], ["'tpu'", "auto", "cpu", "cuda"]),
    (["model.wrappers=[{name:"], ["model.wrappers=[{name:"]),
]
IDS = [" ".join(a) for a, _ in BAD_INPUTS]


def _assert_clear_error(code: int, out: str, err: str, words: list[str]) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert "epoch " not in out and "final metrics" not in out, "it stopped before training"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rnnsearch: error: "), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


@pytest.mark.parametrize("args,words", BAD_INPUTS, ids=IDS)
def test_bad_input_exits_2_with_one_clear_paragraph(run_main, args, words):
    _assert_clear_error(*run_main(*TINY, *args), words)


def test_bad_input_in_a_subprocess(cli):
    res = cli(*TINY, "cell=foo")
    _assert_clear_error(res.returncode, res.stdout, res.stderr, BAD_INPUTS[0][1])


@pytest.mark.slow
@pytest.mark.parametrize("args,words", BAD_INPUTS, ids=IDS)
def test_every_bad_input_in_a_subprocess(cli, args, words):
    res = cli(*TINY, *args)
    _assert_clear_error(res.returncode, res.stdout, res.stderr, words)


def test_divergence_exits_3_with_a_clear_message(run_main):
    code, out, err = run_main(*TINY, "cell=rnn", "cell.activation=relu", "optim=sgd", "optim.lr=1e12",
                              "train.grad_clip=null", "train.epochs=3")
    assert code == 3, (code, out, err)
    assert "Traceback" not in err and "diverged at epoch 1" in err and "optim.lr" in err
