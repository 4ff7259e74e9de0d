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

With ``prior_offset`` (the default) the task adds each key's training-set
log-odds to the model's outputs before the loss — the same as initialising
the output bias at the frequency baseline. Training then starts at the
baseline instead of at 88·ln 2 ≈ 61 nats, where Adam would spend its first
~1,000 steps only learning that most keys are silent; the NLL is still the
exact likelihood of ``σ(output + log-odds)`` and every cell gets the same help.

music21 is an optional dependency (``pip install 'rnnsearch[music]'``).
Parsing the corpus takes minutes, so it happens once: the piano rolls are
cached on disk under ``cache_dir`` (default ``$RNNSEARCH_CACHE`` or
``~/.cache/rnnsearch``). ``max_chorales`` uses only the first N chorales
(tests use a handful).
"""

from __future__ import annotations

import importlib.metadata
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
CACHE_VERSION = 3
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
    """Piano rolls of the first ``max_chorales`` chorales (all when None), parsing only those not cached.

    The cache file (one per music21 version) holds the chorale list and every
    roll parsed so far; when it already has what is asked, music21 is not even
    imported. It is written atomically, so parallel workers can share it (two
    workers parsing at once merge their chorales; at worst one redoes a parse).
    """
    path = cache_dir / f"chorales-music21-{importlib.metadata.version('music21')}-v{CACHE_VERSION}.pt"
    cache = _read_cache(path)
    all_names = cache["names"] or chorale_names()
    names = all_names[:max_chorales] if max_chorales is not None else all_names
    missing = [n for n in names if n not in cache["rolls"]]
    if missing:
        log.info("Parsing %d Bach chorales with music21 (once; cached in %s) ...", len(missing), path)
        parsed = {n: piano_roll(n) for n in missing}
        cache = _read_cache(path)  # another process may have added chorales meanwhile: keep them
        cache["rolls"].update(parsed)
        try:
            _write_cache(path, all_names, cache["rolls"])
        except OSError as exc:
            log.warning("Could not cache the parsed chorales in %s (%s); set task.cache_dir or $RNNSEARCH_CACHE "
                        "to a writable folder to skip parsing next time.", cache_dir, exc)
    return [cache["rolls"][n] for n in names]


def _read_cache(path: Path) -> dict:
    """``{"names": all chorale names, "rolls": {name: roll}}`` from ``path`` (empty when absent)."""
    if path.exists():
        try:
            data = torch.load(path)  # one uint8 tensor of all frames: far faster to load than a tensor per chorale
            rolls = dict(zip(data["parsed"], data["frames"].split(data["lengths"].tolist())))
            return {"names": list(data["names"]), "rolls": rolls}
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            log.warning("Ignoring the unreadable chorale cache %s (%s); parsing again.", path, exc)
    return {"names": [], "rolls": {}}


def _write_cache(path: Path, names: list[str], rolls: dict[str, Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parsed = list(rolls)
    data = {"names": names, "parsed": parsed, "lengths": torch.tensor([rolls[n].shape[0] for n in parsed]),
            "frames": torch.cat([rolls[n] for n in parsed])}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(data, tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


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
        prior_offset: add the keys' training-set log-odds to the outputs (start at the baseline).
        seed: seed of the chorale-level train/val/test split.
    """

    per_step = True
    causal = True  # the next step's input is this step's target: no bidirectional models
    fixed_corpus = True  # split sizes come from the 371 chorales
    metric = "nll"
    direction = "minimize"

    @classmethod
    def check_available(cls) -> None:
        require_music21()

    def __init__(self, max_chorales: Optional[int] = None, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 cache_dir: Optional[str] = None, prior_offset: bool = True, seed: int = 0) -> None:
        if max_chorales is not None:
            check_int("task.max_chorales", max_chorales, 3, "Each of train/val/test needs a chorale; null uses all 371.")
        for what, f in (("task.val_fraction", val_fraction), ("task.test_fraction", test_fraction)):
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                raise ConfigError(f"{what} must be a number in (0, 1), got {f!r}.")
        if val_fraction + test_fraction >= 1:
            raise ConfigError(f"task.val_fraction + task.test_fraction = {val_fraction + test_fraction:g} leaves no "
                              f"training chorales; keep the sum below 1 (default 0.2 + 0.2).")
        if not isinstance(prior_offset, bool):
            raise ConfigError(f"task.prior_offset must be true or false, got {prior_offset!r}.")
        require_music21()
        super().__init__(seed, 0, 0, 0)
        self.max_chorales, self.fractions = max_chorales, (float(val_fraction), float(test_fraction))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.input_size = self.output_size = N_KEYS
        self.solved = PUBLISHED_LSTM_NLL
        self.prior_offset = prior_offset
        self._prior: dict[torch.device, Tensor] = {}
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

    def prior_logits(self, device: torch.device | str = "cpu") -> Tensor:
        """Each key's Laplace-smoothed training-set frequency as log-odds, ``(88,)``."""
        device = torch.device(device)
        if device not in self._prior:
            train = self.split("train")  # y is zero on padding
            p = (train.y.sum((0, 1)) + 1.0) / (train.lengths.sum() + 2.0)  # (88,)
            self._prior[device] = (torch.log(p) - torch.log1p(-p)).to(device)
        return self._prior[device]

    @property
    def baseline(self) -> float:  # type: ignore[override]
        """Test NLL of predicting every key with its Laplace-smoothed training-set frequency."""
        if self._baseline is None:
            test = self.split("test")
            frames, on = test.lengths.sum(), test.y.sum((0, 1))  # y is zero on padding; on: (88,)
            logp = F.logsigmoid(self.prior_logits())
            log1mp = F.logsigmoid(-self.prior_logits())
            self._baseline = float(-(on * logp + (frames - on) * log1mp).sum() / frames)
        return self._baseline

    def logits(self, output: Tensor) -> Tensor:
        """The model's output as per-key log-odds (plus the prior's when ``prior_offset``)."""
        return output + self.prior_logits(output.device) if self.prior_offset else output

    @staticmethod
    def _nll_sums(logits: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        bce = F.binary_cross_entropy_with_logits(logits, batch.y, reduction="none").sum(-1)  # (b, t)
        w = batch.mask.to(bce.dtype)
        return (bce * w).sum(), w.sum()

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        total, count = self._nll_sums(self.logits(output), batch)
        return total / count.clamp(min=1.0)

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        logits = self.logits(output)
        nll = self._nll_sums(logits, batch)
        pred = (logits > 0) & batch.mask.unsqueeze(-1)  # (b, t, 88)
        truth = batch.y > 0.5
        tp = (pred & truth).sum().float()
        return {"loss": nll, "nll": nll, "acc": (tp, (pred | truth).sum().float())}
