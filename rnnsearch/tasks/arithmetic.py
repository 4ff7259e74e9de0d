"""``arithmetic``: character-level addition and subtraction (Jozefowicz, Zaremba & Sutskever 2015, §3.1).

The model reads a question such as ``"3e36d9-h1h39f94eeh43keg3c="`` one
character at a time — two integers, an operator, optional distractor letters
``a``–``k`` between characters — and then emits the answer's characters and
an end mark (``-13990.``), each step seeing the previous answer character
(teacher forcing). Only the answer steps are scored; the rest and the padding
are masked. The paper's setting: operands of up to 8 digits, both signs, a
random number of distractors; the default here (up to 3 digits, positive, no
distractors) learns on a CPU in minutes.

Metrics: ``accuracy`` (headline) is the fraction of questions whose whole
answer is right — with teacher forcing, every step's argmax right is exactly
"greedy decoding returns the answer"; ``char_ce`` is the cross-entropy per
answer character (the loss) and ``char_acc`` the per-character accuracy.
Baseline: the accuracy of always answering the training split's most frequent
answer, measured on the test split (≈ 0.0 for any non-trivial setting).
Solved: test accuracy > 0.99.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rnnsearch.errors import ConfigError

from .base import Batch, Task
from .common import accuracy_sums, ce_sums, check_int, masked_mean, sequence_accuracy_sums
from .registry import register_task

PAD = "_"
CHARS = PAD + "0123456789+-=." + "abcdefghijk"  # token id = index; a-k are the paper's distractors
TOKEN = {c: i for i, c in enumerate(CHARS)}
N_OUTPUTS = CHARS.index(".") + 1  # answers use pad..'.' only
DISTRACTORS = CHARS[CHARS.index("a") :]


def encode(text: str) -> list[int]:
    """Token ids of ``text`` (characters of :data:`CHARS`)."""
    return [TOKEN[c] for c in text]


def decode(tokens: Tensor | list[int]) -> str:
    """The characters of token ids (padding dropped)."""
    return "".join(CHARS[int(t)] for t in tokens if int(t) != 0)


@register_task("arithmetic")
class ArithmeticTask(Task):
    """Character-level addition/subtraction.

    Args:
        max_digits: operands have 1..max_digits digits (the paper: 8).
        operations: which of ``+`` and ``-`` to ask, e.g. ``"+-"`` or ``"+"``.
        negative: operands may be negative (the paper: yes).
        max_distractors: up to this many distractor letters between question characters (0: none).
        seed, train_size, val_size, test_size: data seed and split sizes.
    """

    per_step = True
    token_input = True
    metric = "accuracy"
    direction = "maximize"

    def __init__(self, max_digits: int = 3, operations: str = "+-", negative: bool = False, max_distractors: int = 0,
                 seed: int = 0, train_size: int = 10000, val_size: int = 1000, test_size: int = 1000) -> None:
        super().__init__(seed, train_size, val_size, test_size)
        self.max_digits = check_int("task.max_digits", max_digits, 1)
        if self.max_digits > 15:
            raise ConfigError(f"task.max_digits={max_digits} is too large: operands must stay exact in float64; use <= 15 "
                              f"(the paper uses 8).")
        ops = str(operations)
        if not ops or any(c not in "+-" for c in ops):
            raise ConfigError(f"task.operations={operations!r} must be a non-empty string of '+' and/or '-', e.g. '+-'.")
        self.operations = "".join(sorted(set(ops)))
        if not isinstance(negative, bool):
            raise ConfigError(f"task.negative must be true or false, got {negative!r}.")
        self.negative = negative
        self.max_distractors = check_int("task.max_distractors", max_distractors, 0)
        self.input_size, self.output_size = len(CHARS), N_OUTPUTS
        self.solved = 0.99
        self._baseline: Optional[float] = None

    @property
    def baseline(self) -> float:  # type: ignore[override]
        """Test accuracy of always giving the training split's most frequent answer."""
        if self._baseline is None:
            train, test = self.split("train"), self.split("test")
            counts: dict[tuple[int, ...], int] = {}
            for ans in _answers(train):
                counts[ans] = counts.get(ans, 0) + 1
            mode = max(counts, key=lambda a: (counts[a], a))
            test_answers = _answers(test)
            self._baseline = sum(a == mode for a in test_answers) / max(len(test_answers), 1)
        return self._baseline

    def _operands(self, n: int, g: torch.Generator) -> Tensor:
        digits = torch.randint(1, self.max_digits + 1, (n,), generator=g).double()
        low = torch.where(digits == 1, 0.0, 10.0 ** (digits - 1))
        high = 10.0**digits - 1
        value = (low + torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (high - low + 1))).long()
        if self.negative:
            value = torch.where(torch.rand(n, generator=g) < 0.5, -value, value)
        return value

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        a, b = self._operands(n, generator), self._operands(n, generator)
        op = torch.randint(0, len(self.operations), (n,), generator=generator)
        q_max = 2 * self.max_digits + 4  # sign, digits, operator, sign, digits, '='
        counts = torch.randint(0, self.max_distractors + 1, (n, q_max), generator=generator)
        letters = torch.randint(0, len(DISTRACTORS), (n, q_max, max(self.max_distractors, 1)), generator=generator)
        rows = []
        for i, (ai, bi, oi) in enumerate(zip(a.tolist(), b.tolist(), op.tolist())):
            sym = self.operations[oi]
            question = f"{ai}{sym}{bi}="
            if self.max_distractors:
                parts = []
                for j, ch in enumerate(question):
                    if j:  # distractors between successive characters
                        parts.extend(DISTRACTORS[k] for k in letters[i, j, : counts[i, j]].tolist())
                    parts.append(ch)
                question = "".join(parts)
            answer = f"{ai + bi if sym == '+' else ai - bi}."
            rows.append((encode(question), encode(answer)))
        lengths = torch.tensor([len(q) + len(ans) - 1 for q, ans in rows])
        T = int(lengths.max())
        x = torch.zeros(n, T, dtype=torch.long)
        y = torch.zeros(n, T, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.bool)
        for i, (q, ans) in enumerate(rows):
            seq = q + ans[:-1]  # the answer's characters are fed back, the end mark is only predicted
            x[i, : len(seq)] = torch.tensor(seq)
            y[i, len(q) - 1 : len(seq)] = torch.tensor(ans)
            mask[i, len(q) - 1 : len(seq)] = True
        return Batch(x, y, lengths, mask)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return masked_mean(ce_sums(output, batch.y, batch.mask))

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        ce = ce_sums(output, batch.y, batch.mask)
        return {"loss": ce, "char_ce": ce, "char_acc": accuracy_sums(output, batch.y, batch.mask),
                "accuracy": sequence_accuracy_sums(output, batch.y, batch.mask)}


def _answers(batch: Batch) -> list[tuple[int, ...]]:
    """Each row's answer tokens (the masked targets), as tuples."""
    return [tuple(row[m].tolist()) for row, m in zip(batch.y, batch.mask)]
