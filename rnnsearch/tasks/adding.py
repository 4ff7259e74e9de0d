"""``adding``: the adding problem (Hochreiter & Schmidhuber 1997, modern variant of Arjovsky et al. 2016).

Each step carries two features: a value ~ U(0, 1) and a marker. Exactly one
marker is set in each half of the sequence; the target is the sum of the two
marked values. Always predicting 1 (the target's mean) scores MSE = 1/6 ≈ 0.1667,
the baseline to beat; by convention the task is solved at test MSE < 0.01.
Lengths used in papers: 100–750 (IndRNN goes past 5,000).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnsearch.errors import ConfigError, check_positive_int

from .base import Batch, Task
from .registry import register_task


@register_task("adding")
class AddingTask(Task):
    """Adding problem.

    Args:
        seq_len: steps per sequence (at least 2: one marker per half).
        seed: data seed (fixed splits).
        train_size, val_size, test_size: examples per split.
    """

    metric = "mse"
    direction = "minimize"

    def __init__(self, seq_len: int = 50, seed: int = 0, train_size: int = 10000, val_size: int = 1000,
                 test_size: int = 1000) -> None:
        super().__init__(seed, train_size, val_size, test_size)
        check_positive_int("task.seq_len", seq_len)
        if seq_len < 2:
            raise ConfigError(f"task.seq_len={seq_len} is too short for the adding problem: it needs one marker "
                              f"in each half, so seq_len >= 2 (papers use 100-750).")
        self.seq_len = seq_len
        self.input_size, self.output_size = 2, 1
        self.baseline, self.solved = 1.0 / 6.0, 0.01

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        T, half = self.seq_len, self.seq_len // 2
        values = torch.rand(n, T, generator=generator)
        first = torch.randint(0, half, (n,), generator=generator)
        second = torch.randint(half, T, (n,), generator=generator)
        markers = torch.zeros(n, T)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        x = torch.stack([values, markers], -1)  # (n, t, 2)
        y = (values * markers).sum(1, keepdim=True)  # (n, 1)
        return Batch(x, y)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        return torch.nn.functional.mse_loss(output, batch.y)

    def metric_sums(self, output: Tensor, batch: Batch) -> dict[str, tuple[Tensor, Tensor]]:
        se = (output - batch.y).pow(2).sum()
        n = torch.tensor(float(batch.y.numel()), device=output.device)
        return {"loss": (se, n), "mse": (se, n)}
