"""``digits``: scikit-learn's bundled 8×8 handwritten digits read as a sequence (sMNIST / pMNIST at small scale).

The sequential-MNIST protocol (Le, Jaitly & Hinton 2015, "A Simple Way to
Initialize Recurrent Networks of Rectified Linear Units") reads an image one
pixel per step and classifies it after the last step; the permuted variant
first applies one fixed random permutation to the pixels, which breaks
locality and stretches the dependencies. Here the images are the 1,797 8×8
digits that ship inside scikit-learn (``sklearn.datasets.load_digits``, the
UCI optdigits test set; nothing is downloaded), read pixel by pixel (64 steps,
1 feature: the standard setting) or row by row (8 steps of 8 pixels).

Reported on MNIST: LSTM ≈ 98.2–98.5% (sequential) / 88–91% (permuted), IRNN
97 / 82, IndRNN 99.0 / 96.0. On these digits read pixel by pixel one measured
run gave tanh RNN 40%, LSTM 74%, GRU 82% (an SVC on the flat image: 97%); read
row by row the cells do not separate. Baseline: chance, 0.10 (the ten classes
are balanced, so the majority class scores ≈ 0.10 too). Solved: test accuracy
> 0.95, near the SVC reference. The splits are stratified by class and fixed
by ``seed``; pixel values are scaled to [0, 1].
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from rnnsearch.errors import ConfigError, choice_error

from .base import SPLITS, Batch, Task
from .common import accuracy_sums, ce_sums, check_int, masked_mean
from .registry import register_task

MODES = ("pixel", "row")
N_IMAGES = 1797


@functools.lru_cache(maxsize=1)
def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 images as ``(n, 64)`` floats in [0, 1] and labels ``(n,)`` int64 (loaded once; do not modify).

    Reads ``sklearn/datasets/data/digits.csv.gz`` (what ``load_digits`` reads)
    straight from the installed package: importing scikit-learn takes seconds.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "datasets" / "data" / "digits.csv.gz" \
        if spec else None
    if path is not None and path.is_file():
        data = torch.from_numpy(np.loadtxt(path, delimiter=",", dtype=np.float32))  # (1797, 65): pixels, label
        images, labels = data[:, :-1], data[:, -1].long()
    else:  # a scikit-learn that stores its data elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)
    return images / 16.0, labels


def stratified_split(labels: Tensor, sizes: dict[str, int], generator: torch.Generator) -> dict[str, Tensor]:
    """Indices of each split (in ``sizes`` order), keeping class proportions, shuffled by ``generator``.

    Each split takes from every class in proportion to what is left of it
    (largest remainders), so the splits are disjoint and stratified.
    """
    per_class = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    per_class = [idx[torch.randperm(idx.numel(), generator=generator)] for idx in per_class]
    used = [0] * len(per_class)
    out: dict[str, Tensor] = {}
    for split, size in sizes.items():
        left = [idx.numel() - u for idx, u in zip(per_class, used)]
        quota = [size * n / max(sum(left), 1) for n in left]
        take = [int(q) for q in quota]
        by_remainder = sorted(range(len(quota)), key=lambda i: quota[i] - take[i], reverse=True)
        for i in by_remainder[: size - sum(take)]:
            take[i] += 1
        parts = [idx[u : u + k] for idx, u, k in zip(per_class, used, take)]
        used = [u + k for u, k in zip(used, take)]
        chosen = torch.cat(parts)
        out[split] = chosen[torch.randperm(chosen.numel(), generator=generator)]
    return out


@register_task("digits")
class DigitsTask(Task):
    """Sequential (optionally permuted) 8×8 digits classification.

    Args:
        mode: ``pixel`` (64 steps × 1 feature) or ``row`` (8 steps × 8 features).
        permute: apply one fixed random pixel permutation (the pMNIST protocol).
        permutation_seed: seed of that permutation (fixed, independent of the split seed).
        seed: seed of the stratified train/val/test split.
        train_size: training images (null: all not in val/test); val_size, test_size: held-out images.
    """

    metric = "accuracy"
    direction = "maximize"

    def __init__(self, mode: str = "pixel", permute: bool = False, permutation_seed: int = 0, seed: int = 0,
                 train_size: Optional[int] = None, val_size: int = 300, test_size: int = 300) -> None:
        if mode not in MODES:
            raise choice_error("task.mode", mode, MODES, "pixel reads 64 steps of 1 pixel, row 8 steps of 8 pixels.")
        if not isinstance(permute, bool):
            raise ConfigError(f"task.permute must be true or false, got {permute!r}.")
        val_size = check_int("task.val_size", val_size, 1)
        test_size = check_int("task.test_size", test_size, 1)
        rest = N_IMAGES - val_size - test_size
        if train_size is None:
            train_size = max(rest, 1)
        train_size = check_int("task.train_size", train_size, 1)
        if train_size > rest:
            raise ConfigError(f"task.train_size={train_size} + val_size={val_size} + test_size={test_size} exceeds the "
                              f"{N_IMAGES} digits images; use train_size <= {max(rest, 0)} (or null for all the rest).")
        super().__init__(seed, train_size, val_size, test_size)
        self.mode, self.permute, self.permutation_seed = mode, permute, int(permutation_seed)
        self.input_size = 1 if mode == "pixel" else 8
        self.output_size = 10
        self.seq_len = 64 if mode == "pixel" else 8
        self.baseline, self.solved = 0.1, 0.95
        self._splits: Optional[dict[str, Batch]] = None

    def make_split(self, name: str) -> Batch:
        if self._splits is None:
            images, labels = load_digits_tensors()
            if self.permute:
                perm = torch.randperm(64, generator=torch.Generator().manual_seed(self.permutation_seed))
                images = images[:, perm]
            x = images.view(-1, self.seq_len, self.input_size)  # (n, t, features)
            g = torch.Generator().manual_seed(self.seed)
            idx = stratified_split(labels, {s: self.sizes[s] for s in ("val", "test", "train")}, g)
            self._splits = {s: Batch(x[idx[s]].contiguous(), labels[idx[s]]) for s in SPLITS}
        return self._splits[name]

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return masked_mean(ce_sums(output, batch.y))

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        return {"loss": ce_sums(output, batch.y), "accuracy": accuracy_sums(output, batch.y)}
