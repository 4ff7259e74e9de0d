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
    causal = True  # the next step's input is this step's target: no bidirectional models
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
            answers, counts = _answers(self.split("train")).unique(dim=0, return_counts=True)
            mode = answers[counts.argmax()]  # ties: the lexicographically smallest answer
            self._baseline = float((_answers(self.split("test")) == mode).all(1).float().mean())
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
        minus = torch.tensor([c == "-" for c in self.operations])[op]  # (n,) bool
        c = torch.where(minus, a - b, a + b)
        # Every character slot any example could use, with a validity mask; then compact each row.
        a_chars, a_ok = _number_slots(a, self.max_digits)
        b_chars, b_ok = _number_slots(b, self.max_digits)
        op_char = torch.where(minus, TOKEN["-"], TOKEN["+"]).unsqueeze(1)  # (n, 1)
        question = torch.cat([a_chars, op_char, b_chars, torch.full((n, 1), TOKEN["="])], 1)  # (n, 2·digits+4)
        one = torch.ones(n, 1, dtype=torch.bool)
        q_ok = torch.cat([a_ok, one, b_ok, one], 1)
        if self.max_distractors:
            question, q_ok = self._add_distractors(question, q_ok, generator)
        answer, a_ok = _number_slots(c, self.max_digits + 1)
        full = torch.cat([question, answer, torch.full((n, 1), TOKEN["."])], 1)
        ok = torch.cat([q_ok, a_ok, torch.ones(n, 1, dtype=torch.bool)], 1)
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)  # valid slots first, in order
        full = full.gather(1, order)
        total = ok.sum(1)  # (n,) characters including the end mark
        q_len = q_ok.sum(1)  # (n,) question characters including '='
        T = int(total.max()) - 1
        steps = torch.arange(T).unsqueeze(0)  # (1, t)
        lengths = total - 1  # the end mark is only predicted, never fed back
        x = full[:, :T].masked_fill(steps >= lengths.unsqueeze(1), 0)
        mask = (steps >= (q_len - 1).unsqueeze(1)) & (steps < lengths.unsqueeze(1))
        y = full[:, 1 : T + 1].masked_fill(~mask, 0)
        return Batch(x, y, lengths, mask)  # x, y, mask: (n, t)

    def _add_distractors(self, chars: Tensor, ok: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Put 0..max_distractors letters before every real character but the first."""
        n, w = chars.shape
        k = self.max_distractors
        counts = torch.randint(0, k + 1, (n, w), generator=g)
        letters = torch.randint(TOKEN[DISTRACTORS[0]], len(CHARS), (n, w, k), generator=g)
        first = ok & (ok.cumsum(1) == 1)
        d_ok = (torch.arange(k) < counts.unsqueeze(2)) & (ok & ~first).unsqueeze(2)  # (n, w, k)
        chars = torch.cat([letters, chars.unsqueeze(2)], 2).flatten(1)  # each slot: k distractors, then the char
        ok = torch.cat([d_ok, ok.unsqueeze(2)], 2).flatten(1)
        return chars, ok

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return masked_mean(ce_sums(output, batch.y, batch.mask))

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        ce = ce_sums(output, batch.y, batch.mask)
        return {"loss": ce, "char_ce": ce, "char_acc": accuracy_sums(output, batch.y, batch.mask),
                "accuracy": sequence_accuracy_sums(output, batch.y, batch.mask)}


def _number_slots(value: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Token slots ``(n, 1 + width)`` of ``value``'s sign and digits, and which slots are used."""
    mag = value.abs()
    powers = 10 ** torch.arange(width - 1, -1, -1)  # (width,) most significant first
    digits = (mag.unsqueeze(1) // powers) % 10  # (n, width)
    n_digits = 1 + (mag.unsqueeze(1) >= powers[:-1].flip(0)).sum(1) if width > 1 else torch.ones_like(mag)
    used = torch.arange(width).unsqueeze(0) >= (width - n_digits).unsqueeze(1)
    chars = torch.cat([torch.full_like(mag, TOKEN["-"]).unsqueeze(1), digits + TOKEN["0"]], 1)
    ok = torch.cat([(value < 0).unsqueeze(1), used], 1)
    return chars, ok


def _answers(batch: Batch) -> Tensor:
    """Each row's answer tokens (its masked targets), left-aligned and zero-padded: ``(n, longest answer)``."""
    start = batch.mask.to(torch.int8).argmax(1, keepdim=True)  # (n, 1) first answer step
    width = int(batch.mask.sum(1).max())
    idx = (start + torch.arange(width)).clamp(max=batch.y.shape[1] - 1)
    return (batch.y * batch.mask).gather(1, idx) * (torch.arange(width) < batch.mask.sum(1, keepdim=True))
