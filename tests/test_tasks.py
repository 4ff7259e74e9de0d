"""The benchmark task suite: registry, configs, determinism, shapes, baselines, masks, bad input, learnability."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from rnnsearch.errors import ConfigError
from rnnsearch.model import build_model
from rnnsearch.registry import accepted_options
from rnnsearch.tasks import SPLITS, Batch, create_task, list_tasks
from rnnsearch.tasks.registry import TASKS

CONF = Path(__file__).resolve().parents[1] / "conf" / "task"
SMALL = {"train_size": 300, "val_size": 50, "test_size": 50}

# Small instances of every task that needs no optional dependency.
CASES = {
    "adding": dict(seq_len=20, **SMALL),
    "copy": dict(delay=10, **SMALL),
    "tagging": dict(seq_len=16, min_len=6, offset=2, **SMALL),
    "arithmetic": dict(max_digits=3, negative=True, max_distractors=2, **SMALL),
    "digits": dict(train_size=300, val_size=50, test_size=50),
    "digits_row_permuted": dict(mode="row", permute=True),
}


def make(case: str, **overrides: object):
    name = "digits" if case.startswith("digits") else case
    return create_task(name, **{**CASES[case], **overrides})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other processes share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same(a: Batch, b: Batch) -> bool:
    return all((u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
               for u, v in zip((a.x, a.y, a.lengths, a.mask), (b.x, b.y, b.lengths, b.mask)))


# -- registry and configs ----------------------------------------------------------------------------
def test_every_task_is_registered():
    assert {"adding", "copy", "digits", "chorales", "arithmetic", "tagging"} <= set(list_tasks())


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_file_matches_the_task(path):
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert cfg["name"] == path.stem, "registry key = conf file name = config name"
    cls = TASKS.get(cfg["name"])
    assert set(cfg) - {"name"} == set(accepted_options(cls.__init__, skip=("self",))), "config keys = constructor args"
    for attr in ("metric", "direction"):
        assert getattr(cls, attr)
    assert cls.direction in ("minimize", "maximize")
    if cfg["name"] == "chorales" and importlib.util.find_spec("music21") is None:
        pytest.skip("music21 is not installed (pip install 'rnnsearch[music]')")
    task = create_task(cfg)
    assert task.input_size > 0 and task.output_size > 0


# -- determinism, shapes, dtypes -----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_data_other_seed_other_data(case):
    a, b, c = make(case), make(case), make(case, seed=1)
    for s in SPLITS:
        assert same(a.split(s), b.split(s))
    assert not same(a.split("train"), c.split("train"))
    assert not torch.equal(a.split("train").x[:10], a.split("val").x[:10])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for u, v in zip(a.batches("train", 64, shuffle=True, generator=g1), b.batches("train", 64, shuffle=True, generator=g2)):
        assert same(u, v)


@pytest.mark.parametrize("case", CASES)
def test_shapes_dtypes_and_model_fit(case):
    task = make(case)
    data = task.split("train")
    n, t = data.x.shape[:2]
    assert n == task.sizes["train"]
    if task.token_input:
        assert data.x.dtype == torch.long and data.x.dim() == 2
        assert 0 <= int(data.x.min()) and int(data.x.max()) < task.input_size
    else:
        assert data.x.dtype == torch.float32 and data.x.shape[2] == task.input_size
    if task.per_step:
        assert data.y.shape[:2] == (n, t)
    else:
        assert data.y.shape[0] == n
    if data.lengths is not None:
        assert data.lengths.dtype == torch.long and data.lengths.shape == (n,)
        assert int(data.lengths.max()) == t and int(data.lengths.min()) >= 1
    if data.mask is not None:
        assert data.mask.dtype == torch.bool and data.mask.shape == (n, t)
    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 8}}
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step, token_input=task.token_input)
    batch = next(task.batches("val", 16))
    out = model(batch.x, batch.lengths)
    loss = task.loss(out, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    sums = task.metric_sums(out.detach(), batch)
    assert {"loss", task.metric} <= set(sums)
    assert task.describe().startswith(task.registry_name)


def test_digits_splits_are_disjoint_stratified_and_permuted():
    task = create_task("digits")
    assert {s: len(task.split(s)) for s in SPLITS} == {"train": 1197, "val": 300, "test": 300}
    images = torch.cat([task.split(s).x.flatten(1) for s in SPLITS])
    assert torch.unique(images, dim=0).shape[0] >= images.shape[0] - 5  # the data set has a few duplicate images
    for s in ("val", "test"):
        counts = task.split(s).y.bincount(minlength=10)
        assert int(counts.min()) >= 29 and int(counts.max()) <= 31
    plain, perm = task.split("test").x.flatten(1), create_task("digits", permute=True).split("test").x.flatten(1)
    assert not torch.equal(plain, perm)
    assert torch.equal(plain.sort(1).values, perm.sort(1).values), "same images, pixels reordered"
    other = create_task("digits", permute=True, permutation_seed=1).split("test").x.flatten(1)
    assert not torch.equal(perm, other)
    row = create_task("digits", mode="row").split("test")
    assert row.x.shape[1:] == (8, 8) and torch.equal(row.x.flatten(1), plain)


def test_copy_layout():
    task = create_task("copy", delay=4, n_symbols=3, n_categories=5, **SMALL)
    b = task.split("val")
    assert b.x.shape[1] == task.seq_len == 4 + 6
    x, y = b.x[0].tolist(), b.y[0].tolist()
    assert x[3:] == [0, 0, 0, 6, 0, 0, 0] and all(1 <= s <= 5 for s in x[:3])
    assert y[:7] == [0] * 7 and y[7:] == x[:3]


def test_arithmetic_answers_are_right():
    from rnnsearch.tasks.arithmetic import DISTRACTORS, decode

    task = make("arithmetic")
    b = task.split("val")
    for i in range(len(b)):
        seq = decode(b.x[i, : b.lengths[i]])
        answer = decode(b.y[i][b.mask[i]])
        question = "".join(c for c in seq[: seq.index("=")] if c not in DISTRACTORS)
        assert answer.endswith(".") and seq.endswith("=" + answer[:-1])
        assert eval(question.replace("--", "+").replace("+-", "-")) == int(answer[:-1])  # noqa: S307


# -- baselines on real batches -----------------------------------------------------------------------
def epoch_value(task, split: str, predict) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for batch in task.batches(split, 256):
        for k, (s, n) in task.metric_sums(predict(batch), batch).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    return {k: s / n for k, (s, n) in sums.items()}


def test_adding_baseline_is_one_sixth():
    task = create_task("adding", seq_len=50, test_size=20000)
    assert task.baseline == pytest.approx(1 / 6)
    mse = epoch_value(task, "test", lambda b: torch.ones_like(b.y))["mse"]
    assert mse == pytest.approx(1 / 6, abs=0.005)


@pytest.mark.parametrize("delay", [100, 200])
def test_copy_memoryless_baseline(delay):
    task = create_task("copy", delay=delay, train_size=10, val_size=10, test_size=2000)
    assert task.baseline == pytest.approx(10 * math.log(8) / (delay + 20))
    assert task.baseline == pytest.approx({100: 0.173, 200: 0.0945}[delay], abs=5e-4)

    def memoryless(b: Batch) -> torch.Tensor:  # blank until the delimiter, then uniform over the 8 symbols
        out = torch.full((*b.y.shape, task.output_size), -1e9)
        out[:, : -10, 0] = 0.0
        out[:, -10:, 1:] = 0.0
        return out

    v = epoch_value(task, "test", memoryless)
    assert v["ce"] == pytest.approx(task.baseline, rel=1e-5)
    assert v["recall_acc"] == pytest.approx(1 / 8, abs=0.01)


def test_digits_majority_class_is_chance():
    task = create_task("digits")
    majority = int(task.split("train").y.bincount().argmax())
    acc = epoch_value(task, "test", lambda b: torch.nn.functional.one_hot(torch.full_like(b.y, majority), 10).float())
    assert acc["accuracy"] == pytest.approx(task.baseline, abs=0.01)


def test_tagging_forward_only_predictor_scores_chance():
    task = create_task("tagging", test_size=4000)
    # The best a forward model can do is a function of the past; the current token is one such function.
    acc = epoch_value(task, "test", lambda b: torch.nn.functional.one_hot(b.x, task.vocab_size).float())
    assert acc["accuracy"] == pytest.approx(task.baseline, abs=0.01)


def test_arithmetic_baseline_is_the_most_frequent_answer():
    task = create_task("arithmetic", max_digits=1, operations="+", **SMALL)
    train = task.split("train")
    counts = Counter(tuple(r[m].tolist()) for r, m in zip(train.y, train.mask))
    top = max(counts.values())
    mode = min(a for a in counts if counts[a] == top)  # ties: the smallest answer, as the task breaks them

    def constant(b: Batch) -> torch.Tensor:
        out = torch.zeros(*b.y.shape, task.output_size)
        for i in range(len(b)):
            pos = b.mask[i].nonzero().flatten()
            seq = (list(mode) + [0] * len(pos))[: len(pos)]
            out[i, pos, torch.tensor(seq)] = 1.0
        return out

    acc = epoch_value(task, "test", constant)["accuracy"]
    assert acc == pytest.approx(task.baseline) and 0.0 < task.baseline < 0.2
    assert create_task("arithmetic", train_size=3000, test_size=1000).baseline < 0.02


# -- masks and padding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tagging", "arithmetic"])
def test_masks_hide_padding(case):
    task = make(case)
    data = task.split("val")
    steps = torch.arange(data.x.shape[1])
    assert not (data.mask & (steps >= data.lengths.unsqueeze(1))).any(), "no target past a sequence's length"
    assert (data.x[steps.expand_as(data.x) >= data.lengths.unsqueeze(1)] == 0).all(), "padding is token 0"
    torch.manual_seed(0)
    out = torch.randn(*data.y.shape, task.output_size)
    noisy = torch.where(data.mask.unsqueeze(-1), out, torch.randn_like(out) * 100)
    a, b = task.metric_sums(out, data), task.metric_sums(noisy, data)
    for k in a:
        assert torch.allclose(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    assert torch.allclose(task.loss(out, data), task.loss(noisy, data))


def test_batches_trim_padding_to_the_longest_sequence():
    task = make("tagging")
    data = task.split("train")
    g = torch.Generator().manual_seed(0)
    seen = 0
    for b in task.batches("train", 7, shuffle=True, generator=g):
        assert b.x.shape[1] == int(b.lengths.max()) == b.y.shape[1] == b.mask.shape[1]
        seen += len(b)
    assert seen == len(data)
    full = create_task("adding", seq_len=20, **SMALL)
    assert all(b.x.shape[1] == 20 for b in full.batches("train", 64))


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options, words", [
    ("adding", {"seq_len": 1}, ["seq_len=1", "seq_len >= 2"]),
    ("copy", {"delay": 0}, ["task.delay", ">= 1"]),
    ("tagging", {"seq_len": 3, "offset": 3}, ["task.seq_len", "offset"]),
    ("tagging", {"min_len": 50}, ["min_len=50", "seq_len=40"]),
    ("digits", {"mode": "column"}, ["'column'", "pixel", "row"]),
    ("digits", {"val_size": 1000, "test_size": 1000}, ["1797", "train_size"]),
    ("arithmetic", {"operations": "*"}, ["'*'", "'+'"]),
    ("arithmetic", {"max_digits": 0}, ["task.max_digits", ">= 1"]),
    ("adding", {"permute": True}, ["permute", "no pixels", "task=digits"]),
    ("tagging", {"permute": True}, ["permute", "task=digits"]),
    ("copy", {"colour": "red"}, ["'colour'", "valid options", "delay"]),
    ("sorting", {}, ["'sorting'", "adding", "copy"]),
])
def test_bad_input_is_one_clear_config_error(name, options, words):
    with pytest.raises(ConfigError) as err:
        create_task(name, **options)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("lengths, words", [
    ([4, 0, 2], ["'tagging'", "train split", "sequence 1 has length 0", "1..4", "1 of 3"]),
    ([4, 5, 9], ["sequence 1 has length 5", "1..4", "2 of 3"]),
    ([[4, 4, 4]], ["1-D integer tensor", "(3)", "(1, 3)"]),
    ([4.0, 1.0, 2.0], ["1-D integer tensor", "torch.float32"]),
    ([True, True, False], ["1-D integer tensor", "torch.bool"]),
], ids=["empty", "too-long", "shape", "float", "bool"])
def test_a_split_with_bad_lengths_is_one_clear_error(monkeypatch, lengths, words):
    """A task's lengths are checked once, when its split is made: a bad one names the row, value and range."""
    task = make("tagging")
    bad = Batch(torch.zeros(3, 4, 1), torch.zeros(3, 4, dtype=torch.long), torch.tensor(lengths),
                torch.ones(3, 4, dtype=torch.bool))
    monkeypatch.setattr(task, "make_split", lambda name: bad)
    with pytest.raises(ValueError) as err:
        task.split("train")
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_missing_music21_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "music21" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'rnnsearch\[music\]'"):
        create_task("chorales", max_chorales=3)


# -- learnability --------------------------------------------------------------------------------------
def run(task: dict, epochs: int, batch_size: int = 32, **model) -> dict:
    from rnnsearch.train import train

    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 32, "num_layers": 1, **model}, "task": task,
           "optim": {"name": "adam", "lr": 3e-3}, "train": {"epochs": epochs, "batch_size": batch_size},
           "seed": 0, "device": "cpu"}
    return train(cfg)


def test_lstm_learns_digits_row_by_row():
    r = run({"name": "digits", "mode": "row"}, epochs=3)
    assert r["test/accuracy"] > 0.6  # baseline 0.10


@pytest.mark.slow
def test_lstm_learns_adding():
    r = run({"name": "adding", "seq_len": 20, "train_size": 2000, "val_size": 200, "test_size": 200}, epochs=8)
    assert r["test/mse"] < 0.02  # baseline 0.167


@pytest.mark.slow
def test_lstm_learns_copy():
    task = {"name": "copy", "delay": 5, "n_symbols": 3, "train_size": 2000, "val_size": 200, "test_size": 200}
    r = run(task, epochs=10)
    assert r["test/recall_acc"] > 0.4  # memoryless: 1/8; measured 0.53
    assert r["test/ce"] < 0.7 * create_task(task).baseline  # measured: 0.29 against 0.567


@pytest.mark.slow
def test_bidirectional_lstm_wins_tagging():
    task = {"name": "tagging", "seq_len": 20, "min_len": 10, "train_size": 1000, "val_size": 200, "test_size": 200}
    uni, bi = run(task, epochs=5), run(task, epochs=5, bidirectional=True)
    assert uni["test/accuracy"] < 0.125 + 0.04  # a forward model cannot see the tag
    assert bi["test/accuracy"] > 0.4


@pytest.mark.slow
def test_lstm_learns_one_digit_arithmetic():
    r = run({"name": "arithmetic", "max_digits": 1, "train_size": 2000, "val_size": 200, "test_size": 200}, epochs=10)
    assert r["test/accuracy"] > 0.5  # baseline ~0.05


def test_causal_tasks_are_the_ones_whose_targets_are_later_inputs():
    """The flag that keeps bidirectional models off a task must match what the task's data really is."""
    from rnnsearch.tasks import TASKS

    for name in ("adding", "copy", "tagging", "arithmetic"):
        task = make(name)
        b = task.split("train")
        causal = False
        if b.x.dim() == 2 and b.y.dim() == 2 and b.mask is not None:  # per-step token targets
            inner = b.mask[:, :-1]  # scored steps that have a next input inside their sequence
            if b.lengths is not None:
                inner = inner & (torch.arange(1, b.x.shape[1]) < b.lengths.unsqueeze(1))
            causal = bool(inner.any()) and bool((b.y[:, :-1][inner] == b.x[:, 1:][inner]).all())
        assert TASKS.get(name).causal == causal, name
    assert TASKS.get("chorales").causal  # its inputs are the previous step's targets (needs music21's corpus)


def test_training_a_bidirectional_model_on_a_causal_task_is_a_clear_error():
    from rnnsearch import ConfigError, train

    with pytest.raises(ConfigError, match="bidirectional=true cannot be used with task 'arithmetic'.*adding"):
        train(compose_config(["task=arithmetic", "model.bidirectional=true", "device=cpu", "tracking=none"]))
