"""``chorales``: polyphonic music modelling on the Bach chorales bundled with music21 (a JSB-like set).

The JSB Chorales protocol (Boulanger-Lewandowski, Bengio & Vincent 2012;
Chung et al. 2014; Greff et al. 2017): each chorale is a piano roll sampled
once per quarter note over the 88 piano keys (MIDI 21–108); the model reads the
frames so far and predicts the next frame as 88 independent Bernoulli
variables. The metric is the frame-level negative log-likelihood: binary
cross-entropy summed over the 88 keys, averaged over frames (``nll``). Also
reported: ``acc``, the frame accuracy of Bay et al. (2009) at threshold 0.5,
ΣTP / Σ(TP + FP + FN). Each sequence starts with a silent frame, so every real
frame is predicted; sequences vary in length and the padding is masked.

Reported test NLL on JSB (~20k-parameter models, Chung et al. 2014): LSTM 8.67,
GRU 8.54, tanh ≈ 9.1–9.2; Greff et al.'s best runs ≈ 8.4–8.8. The data here
are the 371 Riemenschneider chorales that music21 ships
(``corpus.chorales.Iterator``), split 60/20/20 by ``seed``: a JSB-like set,
*not* the exact 382-chorale 229/76/77 split of the published numbers, so
compare cells with each other rather than with the papers. Baseline: the NLL
of predicting each key with its (Laplace-smoothed) training-set frequency,
measured on the test split. Solved: test NLL < 8.67, the published LSTM level
(indicative only, since the sets differ).

music21 is an optional dependency (``pip install 'rnnsearch[music]'``).
Parsing the corpus takes minutes, so it happens once: the piano rolls are
cached on disk under ``cache_dir`` (default ``$RNNSEARCH_CACHE`` or
``~/.cache/rnnsearch``). ``max_chorales`` uses only the first N chorales
(tests use a handful).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnsearch.errors import ConfigError

from .base import SPLITS, Batch, Task
from .common import check_int
from .registry import register_task

log = logging.getLogger(__name__)

LOWEST_KEY, N_KEYS = 21, 88  # MIDI 21 (A0) .. 108 (C8)
CACHE_VERSION = 1
PUBLISHED_LSTM_NLL = 8.67  # Chung et al. 2014, JSB test NLL


def default_cache_dir() -> Path:
    """``$RNNSEARCH_CACHE`` or ``~/.cache/rnnsearch``."""
    return Path(os.environ.get("RNNSEARCH_CACHE") or Path.home() / ".cache" / "rnnsearch")


def require_music21() -> None:
    """Raise a ConfigError naming the fix when music21 is not installed."""
    if importlib.util.find_spec("music21") is None:
        raise ConfigError("task=chorales needs music21 (the Bach chorales ship inside it), which is not installed. "
                          "Install the extra: pip install 'rnnsearch[music]'.")


def chorale_names() -> list[str]:
    """music21 corpus paths of the Riemenschneider chorales, in Riemenschneider order."""
    from music21 import corpus

    return [str(n) for n in corpus.chorales.Iterator(numberingSystem="riemenschneider", returnType="filename")]


def piano_roll(name: str) -> Tensor:
    """Parse one chorale into a ``(frames, 88)`` uint8 quarter-note piano roll.

    Frame k is the instant k quarter notes after the start; a key is on when a
    note of that pitch sounds at that instant (onset <= k < onset + duration).
    """
    from music21 import corpus

    score = corpus.parse(name)
    notes = [(float(n.offset), float(n.quarterLength), [p.midi for p in n.pitches]) for n in score.flatten().notes]
    frames = max(1, math.ceil(max((o + d for o, d, _ in notes), default=0.0) - 1e-6))
    roll = torch.zeros(frames, N_KEYS, dtype=torch.uint8)
    for onset, dur, pitches in notes:
        first, end = math.ceil(onset - 1e-6), math.ceil(onset + dur - 1e-6)
        for midi in pitches:
            if LOWEST_KEY <= midi < LOWEST_KEY + N_KEYS and end > first:
                roll[first:end, midi - LOWEST_KEY] = 1
    return roll


def load_rolls(max_chorales: Optional[int], cache_dir: Path) -> list[Tensor]:
    """Piano rolls of the first ``max_chorales`` chorales (all when None), parsing only those not cached."""
    import music21

    names = chorale_names()
    names = names[:max_chorales] if max_chorales is not None else names
    path = cache_dir / f"chorales-music21-{music21.__version__}-v{CACHE_VERSION}.pt"
    cache: dict[str, Tensor] = torch.load(path) if path.exists() else {}
    missing = [n for n in names if n not in cache]
    if missing:
        log.info("Parsing %d Bach chorales with music21 (once; cached in %s) ...", len(missing), path)
        for n in missing:
            cache[n] = piano_roll(n)
        cache_dir.mkdir(parents=True, exist_ok=True)
        if path.exists():  # another process may have added chorales meanwhile: keep them
            cache = {**torch.load(path), **cache}
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        torch.save(cache, tmp)
        os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file, never half of one
    return [cache[n] for n in names]


def to_batch(rolls: list[Tensor]) -> Batch:
    """Pad rolls into inputs (previous frame, a silent frame first), targets, lengths and a frame mask."""
    lengths = torch.tensor([r.shape[0] for r in rolls])
    T = int(lengths.max())
    y = torch.zeros(len(rolls), T, N_KEYS)
    for i, r in enumerate(rolls):
        y[i, : r.shape[0]] = r.float()
    x = torch.zeros_like(y)
    x[:, 1:] = y[:, :-1]  # (n, t, 88): frame t-1 predicts frame t
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (n, t)
    return Batch(x, y, lengths, mask)


@register_task("chorales")
class ChoralesTask(Task):
    """Next-frame prediction on quarter-note piano rolls of the Bach chorales.

    Args:
        max_chorales: use only the first N chorales in Riemenschneider order (null: all 371; >= 3).
        val_fraction, test_fraction: share of the chorales held out for validation and test.
        cache_dir: where parsed piano rolls are cached (null: $RNNSEARCH_CACHE or ~/.cache/rnnsearch).
        seed: seed of the chorale-level train/val/test split.
    """

    per_step = True
    metric = "nll"
    direction = "minimize"

    def __init__(self, max_chorales: Optional[int] = None, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 cache_dir: Optional[str] = None, seed: int = 0) -> None:
        if max_chorales is not None:
            check_int("task.max_chorales", max_chorales, 3, "Each of train/val/test needs a chorale; null uses all 371.")
        for what, f in (("task.val_fraction", val_fraction), ("task.test_fraction", test_fraction)):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError(f"{what} must be a number in (0, 1), got {f!r}.")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(f"task.val_fraction + task.test_fraction = {val_fraction + test_fraction:g} leaves no "
                              f"training chorales; keep the sum below 1 (default 0.2 + 0.2).")
        require_music21()
        super().__init__(seed, 0, 0, 0)
        self.max_chorales, self.fractions = max_chorales, (float(val_fraction), float(test_fraction))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.input_size = self.output_size = N_KEYS
        self.solved = PUBLISHED_LSTM_NLL
        self._splits: Optional[dict[str, Batch]] = None
        self._baseline: Optional[float] = None

    def make_split(self, name: str) -> Batch:
        if self._splits is None:
            rolls = load_rolls(self.max_chorales, self.cache_dir)
            n = len(rolls)
            n_val = max(1, round(self.fractions[0] * n))
            n_test = max(1, round(self.fractions[1] * n))
            if n - n_val - n_test < 1:
                raise ConfigError(f"task.max_chorales={self.max_chorales} leaves no training chorales after the "
                                  f"val/test fractions; use more chorales.")
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            parts = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
            self._splits = {s: to_batch([rolls[i] for i in parts[s]]) for s in SPLITS}
            self.sizes = {s: len(parts[s]) for s in SPLITS}
        return self._splits[name]

    @property
    def baseline(self) -> float:  # type: ignore[override]
        """Test NLL of predicting every key with its Laplace-smoothed training-set frequency."""
        if self._baseline is None:
            train, test = self.split("train"), self.split("test")
            frames = train.mask.sum()
            p = (train.y[train.mask].sum(0) + 1.0) / (frames + 2.0)  # (88,)
            logits = torch.log(p) - torch.log1p(-p)
            total, count = self._nll_sums(logits.expand_as(test.y), test)
            self._baseline = float(total / count)
        return self._baseline

    @staticmethod
    def _nll_sums(output: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        bce = F.binary_cross_entropy_with_logits(output, batch.y, reduction="none").sum(-1)  # (b, t)
        w = batch.mask.to(bce.dtype)
        return (bce * w).sum(), w.sum()

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        total, count = self._nll_sums(output, batch)
        return total / count.clamp(min=1.0)

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        nll = self._nll_sums(output, batch)
        pred = (output > 0) & batch.mask.unsqueeze(-1)  # (b, t, 88)
        truth = batch.y > 0.5
        tp = (pred & truth).sum().float()
        return {"loss": nll, "nll": nll, "acc": (tp, (pred | truth).sum().float())}
