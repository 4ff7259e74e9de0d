"""``tagging``: lookahead tagging, a sequence-labelling task only a model that sees the future can solve.

Each step carries a token drawn uniformly from ``vocab_size`` symbols; the tag
of step t is the token at step ``t + offset``. The last ``offset`` steps of a
sequence have no tag and are masked. Sequence lengths vary uniformly in
``[min_len, seq_len]`` and the padding is masked, so the task also checks
that the backward direction reverses each sequence within its own length
(TF's ``bidirectional_dynamic_rnn``; Schuster & Paliwal 1997 introduced
bidirectional RNNs for exactly this kind of per-step labelling, e.g. the
tagging and phoneme tasks of Graves & Schmidhuber 2005).

A forward-only model cannot know a future token, so it scores chance,
``1 / vocab_size`` (0.125 at the default 8) — the baseline. A bidirectional
model only has to remember ``offset`` steps of its backward pass and reaches
~100%; solved: test accuracy > 0.99.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnsearch.errors import ConfigError

from .base import Batch, Task
from .common import accuracy_sums, ce_sums, check_int, masked_mean
from .registry import register_task


@register_task("tagging")
class TaggingTask(Task):
    """Tag every step with the token ``offset`` steps later.

    Args:
        seq_len: longest sequence (> offset).
        min_len: shortest sequence (offset < min_len <= seq_len; null: seq_len, i.e. fixed length).
        offset: how far ahead the tag looks (>= 1).
        vocab_size: token alphabet (>= 2); chance accuracy is 1 / vocab_size.
        seed, train_size, val_size, test_size: data seed and split sizes.
    """

    per_step = True
    token_input = True
    metric = "accuracy"
    direction = "maximize"

    def __init__(self, seq_len: int = 40, min_len: int | None = 20, offset: int = 3, vocab_size: int = 8,
                 seed: int = 0, train_size: int = 2000, val_size: int = 500, test_size: int = 1000) -> None:
        super().__init__(seed, train_size, val_size, test_size)
        self.offset = check_int("task.offset", offset, 1)
        self.vocab_size = check_int("task.vocab_size", vocab_size, 2)
        self.seq_len = check_int("task.seq_len", seq_len, self.offset + 1,
                                 f"Each sequence needs at least one tagged step: seq_len > offset ({self.offset}).")
        self.min_len = self.seq_len if min_len is None else check_int(
            "task.min_len", min_len, self.offset + 1, f"Each sequence needs at least one tagged step: min_len > offset ({self.offset}).")
        if self.min_len > self.seq_len:
            raise ConfigError(f"task.min_len={self.min_len} exceeds task.seq_len={self.seq_len}; "
                              f"use min_len <= seq_len (or null for fixed-length sequences).")
        self.input_size = self.output_size = self.vocab_size
        self.baseline, self.solved = 1.0 / self.vocab_size, 0.99

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        T, k = self.seq_len, self.offset
        lengths = torch.randint(self.min_len, T + 1, (n,), generator=generator)
        x = torch.randint(0, self.vocab_size, (n, T), generator=generator)
        steps = torch.arange(T).unsqueeze(0)  # (1, t)
        x = x.masked_fill(steps >= lengths.unsqueeze(1), 0)  # padding is token 0, never looked at
        y = torch.zeros_like(x)
        y[:, : T - k] = x[:, k:]
        mask = steps < (lengths - k).unsqueeze(1)  # (n, t): steps that have a token k steps later
        return Batch(x, y, lengths, mask)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return masked_mean(ce_sums(output, batch.y, batch.mask))

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        return {"loss": ce_sums(output, batch.y, batch.mask), "accuracy": accuracy_sums(output, batch.y, batch.mask)}
