"""``copy``: the copy-memory problem (Arjovsky, Shah & Bengio 2016, "Unitary Evolution RNNs", §4.1).

The input is ``n_symbols`` (10) symbols drawn from ``n_categories`` (8)
categories, then ``delay - 1`` blanks, a delimiter, and ``n_symbols`` more
blanks: ``delay + 2·n_symbols`` steps in all (T + 20). The target is blank at
every step except the last ``n_symbols``, where the model must recall the
symbols in order. The loss is cross-entropy per step averaged over all steps.

A memoryless predictor (blank until the delimiter, then uniform over the
categories) scores ``n_symbols·ln(n_categories) / (delay + 2·n_symbols)``:
10·ln 8 / (T + 20) = 0.173 at T = 100 and 0.0945 at T = 200 — the baseline to
beat (an LSTM famously sits on it for a long time at T ≥ 100). The recall
accuracy on the last ``n_symbols`` steps is reported too (memoryless: 1/8).
Papers use T = 100–2000 (Arjovsky: 100, 200, 300, 500). "Solved" here means a
cross-entropy below 5% of the baseline (≈ 0.1 nats per recalled symbol, i.e.
near-perfect recall). Tokens: 0 blank, 1..n_categories symbols, then the
delimiter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Batch, Task
from .common import accuracy_sums, ce_sums, check_int, masked_mean
from .registry import register_task


@register_task("copy")
class CopyTask(Task):
    """Copy memory.

    Args:
        delay: T, the blanks between the symbols and their recall (>= 1; papers use 100-2000).
        n_symbols: symbols to remember (10 in the paper).
        n_categories: symbol alphabet (8 in the paper).
        seed, train_size, val_size, test_size: data seed and split sizes.
    """

    per_step = True
    token_input = True
    metric = "ce"
    direction = "minimize"

    def __init__(self, delay: int = 50, n_symbols: int = 10, n_categories: int = 8, seed: int = 0,
                 train_size: int = 5000, val_size: int = 500, test_size: int = 1000) -> None:
        super().__init__(seed, train_size, val_size, test_size)
        self.delay = check_int("task.delay", delay, 1, "The copy task needs T >= 1 blank steps "
                               "(the last one is the delimiter); papers use T = 100-2000.")
        self.n_symbols = check_int("task.n_symbols", n_symbols, 1)
        self.n_categories = check_int("task.n_categories", n_categories, 2, "With one category there is nothing to remember.")
        self.seq_len = self.delay + 2 * self.n_symbols
        self.delimiter = self.n_categories + 1
        self.input_size = self.n_categories + 2  # blank, symbols, delimiter
        self.output_size = self.n_categories + 1  # blank, symbols
        self.baseline = self.n_symbols * math.log(self.n_categories) / self.seq_len
        self.solved = 0.05 * self.baseline

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        k, T = self.n_symbols, self.seq_len
        symbols = torch.randint(1, self.n_categories + 1, (n, k), generator=generator)
        x = torch.zeros(n, T, dtype=torch.long)
        x[:, :k] = symbols
        x[:, T - k - 1] = self.delimiter
        y = torch.zeros(n, T, dtype=torch.long)
        y[:, T - k :] = symbols
        return Batch(x, y)  # x, y: (n, t) int64

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return masked_mean(ce_sums(output, batch.y))

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        ce = ce_sums(output, batch.y)
        k = self.n_symbols
        return {"loss": ce, "ce": ce, "recall_acc": accuracy_sums(output[:, -k:], batch.y[:, -k:])}
