"""One training run: seeded reproducibility, divergence stops with a clear message,
callbacks see the run, step budget, bad training options."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from conftest import TINY, compose_config
from rnnsearch import ConfigError, train
from rnnsearch.callbacks import Callback, StopTraining, TrainingDiverged
from rnnsearch.train import resolve_device

#: 4 batches of 32 per epoch.
SMALL = [*TINY, "task.train_size=128", "train.batch_size=32", "train.epochs=2"]


def _numbers(result: dict[str, Any]) -> dict[str, Any]:
    """The result without wall-clock timings."""
    return {k: v for k, v in result.items() if k not in ("epoch_seconds", "tokens_per_s")}


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None, raise_in_epoch: BaseException | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stop_after, self.raise_in_epoch = stop_after, raise_in_epoch

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.calls.append(("begin", info))

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append(("epoch", (epoch, dict(metrics))))
        if self.raise_in_epoch is not None:
            raise self.raise_in_epoch
        if self.stop_after is not None and epoch >= self.stop_after:
            raise StopTraining()

    def on_train_end(self, result: dict[str, Any]) -> None:
        self.calls.append(("end", result))

    def on_train_abort(self, exc: BaseException) -> None:
        self.calls.append(("abort", exc))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.calls]


@pytest.mark.parametrize("extra", [[], ["model.fused=never", "model.wrappers=[{name: dropout, output_keep_prob: 0.8, "
                                        "variational_recurrent: true}]"]], ids=["fused", "cells-dropout"])
def test_same_seed_same_numbers(extra):
    a = train(compose_config([*SMALL, *extra]))
    b = train(compose_config([*SMALL, *extra]))
    assert _numbers(a) == _numbers(b)
    c = train(compose_config([*SMALL, *extra, "seed=1"]))
    assert c["train/loss"] != a["train/loss"], "the seed must matter"


def test_result_has_the_documented_metrics():
    rec = Recorder()
    result = train(compose_config(SMALL), callbacks=[rec])
    for key in ("train/loss", "val/loss", "val/mse", "best/val/mse", "best_epoch", "epochs", "steps", "params",
                "test/loss", "test/mse", "solved", "epoch_seconds", "tokens_per_s"):
        assert key in result, key
    assert result["epochs"] == 2 and result["steps"] == 8 and result["stopped_by"] == "epochs"
    assert isinstance(result["solved"], bool) and all(math.isfinite(result[k]) for k in ("train/loss", "test/mse"))
    assert rec.kinds() == ["begin", "epoch", "epoch", "end"]
    info = rec.calls[0][1]
    assert {"model", "task", "cfg", "params", "device", "epochs"} <= set(info)
    assert info["params"] == result["params"] > 0 and info["device"] == "cpu"
    epochs = [payload for kind, payload in rec.calls if kind == "epoch"]
    assert [e for e, _ in epochs] == [1, 2]
    assert {"train/loss", "val/loss", "val/mse", "epoch_seconds", "tokens_per_s"} <= set(epochs[0][1])
    assert result["best/val/mse"] == min(m["val/mse"] for _, m in epochs)
    assert rec.calls[-1][1] is result


def test_a_callback_can_stop_training_and_keep_the_result():
    rec = Recorder(stop_after=1)
    result = train(compose_config([*SMALL, "train.epochs=5"]), callbacks=[rec])
    assert result["stopped_by"] == "callback" and result["epochs"] == 1
    assert rec.kinds() == ["begin", "epoch", "end"]


def test_an_exception_in_a_callback_aborts_and_is_reported_to_callbacks():
    class Pruned(Exception):
        pass

    rec = Recorder(raise_in_epoch=Pruned("trial pruned"))
    with pytest.raises(Pruned):
        train(compose_config(SMALL), callbacks=[rec])
    assert rec.kinds() == ["begin", "epoch", "abort"]
    assert isinstance(rec.calls[-1][1], Pruned)


def test_max_steps_caps_the_optimizer_steps():
    rec = Recorder()
    result = train(compose_config([*SMALL, "train.epochs=10", "train.max_steps=3"]), callbacks=[rec])
    assert result["steps"] == 3 and result["stopped_by"] == "max_steps" and result["epochs"] == 1
    assert rec.kinds() == ["begin", "epoch", "end"]


def test_non_finite_loss_stops_with_a_clear_message():
    rec = Recorder()
    cfg = compose_config([*SMALL, "train.epochs=5", "cell=rnn", "cell.activation=relu", "optim=sgd",
                          "optim.lr=1e12", "train.grad_clip=null"])
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, callbacks=[rec])
    msg = str(err.value)
    assert "diverged at epoch 1" in msg and "optim.lr" in msg and "1e+12" in msg and "grad_clip" in msg
    assert rec.kinds() == ["begin", "abort"], "no epoch is reported once the loss is not finite"
    assert rec.calls[-1][1] is err.value


@pytest.mark.parametrize("overrides,words", [
    (["train.epochs=0"], ["train.epochs", "0"]),
    (["train.batch_size=-1"], ["train.batch_size", "-1"]),
    (["train.max_steps=0"], ["train.max_steps", "0"]),
    (["optim.lr=0"], ["optim.lr", "0"]),
    (["optim.lr=nan"], ["optim.lr", "nan"]),
    (["optim.name=lbfgs"], ["'lbfgs'", "adam", "sgd"]),
    (["+optim.nesterov_typo=true"], ["optim", "nesterov_typo"]),
    (["device=cuda:99"], ["cuda:99", "auto", "cpu"]),
    # these trained something else (or diverged on purpose) with no error before
    (["train.grad_clip=-1"], ["train.grad_clip", "-1", "null"]),  # a negative clip flipped the gradient
    (["train.grad_clip=0"], ["train.grad_clip", "0"]),
    (["+train.epoch=3"], ["'epoch'", "epochs", "grad_clip"]),  # a misspelt key was ignored
    (["train.eval_batch_size=0"], ["train.eval_batch_size", "0"]),
    (["task.train_size=0"], ["task.train_size", "0"]),  # trained zero steps and reported success
    (["task.val_size=0"], ["task.val_size", "0"]),
    (["seed=-1"], ["seed", "-1"]),
    (["seed=1.7"], ["seed", "1.7"]),
    (["optim=sgd", "optim.momentum=-1"], ["optim", "momentum", "-1"]),  # torch.optim's ValueError
])
def test_bad_training_options_stop_before_training(overrides, words):
    rec = Recorder()
    with pytest.raises(ConfigError) as err:
        train(compose_config([*SMALL, *overrides]), callbacks=[rec])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "epoch" not in rec.kinds()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        resolve_device("gpu0")
    if not torch.backends.mps.is_available():  # it passed, then failed in .to() with PyTorch's own error
        with pytest.raises(ConfigError, match="device='mps' is not available.*auto or cpu"):
            resolve_device("mps")


@pytest.mark.parametrize("task", ["adding", "tagging"])
def test_the_training_loss_is_a_mean_over_examples_not_over_batches(task):
    """70 examples in batches of 64 and 6 (tagging: a different number of scored steps per batch too)."""
    from rnnsearch.train import _lengths

    class Reference(Callback):
        def on_train_begin(self, info: dict[str, Any]) -> None:  # the loss of the whole split, before any step
            model, t = info["model"], info["task"]
            b = t.split("train")
            with torch.no_grad():
                self.loss = t.loss(model(b.x, _lengths(model, b)).float(), b).item()

        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            self.train_loss = metrics["train/loss"]

    ref = Reference()
    extra = ["task.min_len=5"] if task == "tagging" else []
    train(compose_config([*TINY, f"task={task}", "task.train_size=70", "train.batch_size=64", "optim.lr=1e-12",
                          *extra]), callbacks=[ref])  # weights fixed: the epoch's loss is the split's
    assert ref.train_loss == pytest.approx(ref.loss, rel=1e-5)


@pytest.mark.parametrize("task", ["adding", "tagging"])
def test_result_keys_are_the_numeric_keys_train_returns(task):
    # sweeps check their objectives against result_keys before any trial: it must not drift from train()
    from rnnsearch.train import result_keys

    cfg = compose_config([*SMALL, f"task={task}", *(["task.min_len=5"] if task == "tagging" else [])])
    result = train(cfg)
    numeric = {k for k, v in result.items() if isinstance(v, (int, float))}
    assert result_keys(cfg) == numeric
