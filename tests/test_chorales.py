"""The ``chorales`` task on a handful of chorales: parsing, the on-disk cache, shapes, masks, baseline, learnability."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

pytest.importorskip("music21", reason="music21 is not installed (pip install 'rnnsearch[music]')")

from rnnsearch.errors import ConfigError  # noqa: E402
from rnnsearch.tasks import SPLITS, create_task  # noqa: E402
from rnnsearch.tasks import chorales as mod  # noqa: E402

N = 10  # chorales parsed by these tests (~0.2-0.5 s each)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chorale-cache")


@pytest.fixture(scope="module")
def task(cache_dir):
    t = create_task("chorales", max_chorales=N, cache_dir=str(cache_dir))
    for s in SPLITS:
        t.split(s)
    return t


def test_piano_roll_of_the_first_chorale():
    name = mod.chorale_names()[0]
    roll = mod.piano_roll(name)
    assert roll.dtype == torch.uint8 and roll.shape[1] == 88 and roll.shape[0] > 16
    voices = roll.sum(1)
    assert int(voices.max()) <= 4 and float(voices.float().mean()) > 3.0  # four-part harmony, mostly all sounding


def test_splits_shapes_and_masks(task):
    assert sum(task.sizes.values()) == N and all(v >= 1 for v in task.sizes.values())
    assert task.per_step and not task.token_input and task.input_size == task.output_size == 88
    for s in SPLITS:
        b = task.split(s)
        n, t, k = b.x.shape
        assert (n, k) == (task.sizes[s], 88) and b.y.shape == b.x.shape and b.x.dtype == torch.float32
        assert b.mask.shape == (n, t) and torch.equal(b.mask.sum(1), b.lengths)
        assert torch.equal(b.x[:, 0], torch.zeros(n, 88)), "the first input is a silent frame"
        assert torch.equal(b.x[:, 1:] * b.mask[:, 1:, None], b.y[:, :-1] * b.mask[:, 1:, None]), "x is y shifted"
        assert not b.y[~b.mask].any(), "padding has no notes"


def test_cache_is_reused_without_parsing(task, cache_dir, monkeypatch):
    files = list(cache_dir.glob("chorales-*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(mod, "piano_roll", lambda name: pytest.fail(f"parsed {name} again"))
    monkeypatch.setattr(mod, "chorale_names", lambda: pytest.fail("asked music21 for the chorale list again"))
    again = create_task("chorales", max_chorales=N, cache_dir=str(cache_dir))
    for s in SPLITS:
        assert torch.equal(again.split(s).y, task.split(s).y)
    other = create_task("chorales", max_chorales=N, cache_dir=str(cache_dir), seed=1).split("test").y
    mine = task.split("test").y
    assert other.shape != mine.shape or not torch.equal(other, mine), "another seed, another split"


def test_a_damaged_cache_is_rebuilt(tmp_path, task):
    (tmp_path / f"chorales-music21-{importlib.metadata.version('music21')}-v{mod.CACHE_VERSION}.pt").write_bytes(b"junk")
    rolls = mod.load_rolls(3, tmp_path)
    assert len(rolls) == 3 and all(r.shape[1] == 88 for r in rolls)
    assert [r.shape for r in mod.load_rolls(3, tmp_path)] == [r.shape for r in rolls]


def test_baseline_is_the_training_frequency_nll(task):
    train, test = task.split("train"), task.split("test")
    frames = float(train.mask.sum())
    p = (train.y[train.mask].sum(0) + 1) / (frames + 2)
    y = test.y[test.mask]
    nll = -(y * p.log() + (1 - y) * (1 - p).log()).sum(1).mean()
    assert task.baseline == pytest.approx(float(nll), rel=1e-5)
    assert 5.0 < task.baseline < 20.0
    s, n = task.metric_sums(torch.zeros_like(test.y), test)["nll"]
    assert float(s / n) == pytest.approx(task.baseline, rel=1e-5), "prior_offset: a zero output is the baseline"
    raw = create_task("chorales", max_chorales=N, cache_dir=task.cache_dir, prior_offset=False)
    s, n = raw.metric_sums(torch.zeros_like(test.y), raw.split("test"))["nll"]
    assert float(s / n) == pytest.approx(88 * math.log(2), rel=1e-5), "a fair coin per key costs 88 ln 2 nats"
    assert raw.baseline == pytest.approx(task.baseline)


def test_padding_does_not_count(task):
    b = task.split("train")
    torch.manual_seed(0)
    out = torch.randn_like(b.y)
    noisy = torch.where(b.mask.unsqueeze(-1), out, torch.randn_like(out) * 50)
    for k, (s, n) in task.metric_sums(out, b).items():
        s2, n2 = task.metric_sums(noisy, b)[k]
        assert torch.allclose(s, s2) and torch.equal(n, n2)


def test_bad_options():
    with pytest.raises(ConfigError, match="max_chorales"):
        create_task("chorales", max_chorales=2)
    with pytest.raises(ConfigError, match="val_fraction"):
        create_task("chorales", val_fraction=0.6, test_fraction=0.5)


@pytest.mark.slow
def test_lstm_beats_the_frequency_baseline(cache_dir):
    from rnnsearch.train import train

    task = {"name": "chorales", "max_chorales": 30, "cache_dir": str(cache_dir)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 32, "num_layers": 1},
           "task": task, "optim": {"name": "adam", "lr": 1e-2}, "train": {"epochs": 20, "batch_size": 4},
           "seed": 0, "device": "cpu"}
    try:
        r = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert r["test/nll"] < create_task(task).baseline - 0.5  # measured: 9.9 against 11.2


def test_lstm_odyssey_chorales_arm_runs_a_two_trial_smoke_version(cache_dir, tmp_path):
    # The experiment's chorales arms need music21, so they are smoke-tested here (the CI step with the extra);
    # task=chorales on the command line makes the small options settable (the base task is adding otherwise).
    from conftest import run_cli

    res = run_cli(["+experiment=lstm_odyssey", "experiment.only=[chorales-CIFG]", "task=chorales",
                   f"task.max_chorales={N}", f"task.cache_dir={cache_dir}", "sweep.n_trials=2", "sweep.workers=2",
                   "train.epochs=1", "tracking=none", "device=cpu"], tmp_path, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "=== arm 1/1: chorales-CIFG ===" in res.stdout
    assert "chorales-CIFG         2       0       0" in res.stdout  # both trials complete
