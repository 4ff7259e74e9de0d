"""Loss and metric helpers shared by the built-in tasks.

Every helper returns ``(sum, count)`` tensors on the output's device (the
:meth:`Task.metric_sums` convention) and never synchronises with the host:
masks multiply instead of indexing, so padded steps count for nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnsearch.errors import ConfigError

Sums = tuple[Tensor, Tensor]


def _weights(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """``mask`` as float weights (all ones when None), shaped like ``like``."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.float32)
    return mask.to(torch.float32)


def ce_sums(logits: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Sums:
    """Summed cross-entropy of ``logits`` ``(..., classes)`` against int64 ``target`` ``(...)`` over unmasked entries."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    w = _weights(mask, target).reshape(-1)
    return (ce.float() * w).sum(), w.sum()


def accuracy_sums(logits: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Sums:
    """Number of unmasked entries whose argmax equals ``target``, and the number of unmasked entries."""
    w = _weights(mask, target)
    hit = (logits.argmax(-1) == target).float() * w
    return hit.sum(), w.sum()


def sequence_accuracy_sums(logits: Tensor, target: Tensor, mask: Tensor) -> Sums:
    """Sequences (rows) whose every unmasked step is predicted exactly, and the number of rows."""
    wrong = (logits.argmax(-1) != target) & mask  # (b, t)
    ok = (~wrong.any(1)).float()
    return ok.sum(), torch.tensor(float(ok.numel()), device=logits.device)


def masked_mean(sums: Sums) -> Tensor:
    """``sum / count`` (count clamped to 1), for turning sums into a training loss."""
    total, count = sums
    return total / count.clamp(min=1.0)


def check_int(what: str, value: object, low: int, why: str = "") -> int:
    """``value`` as an int ≥ ``low``; else a ConfigError naming the value, the bound and ``why``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        msg = f"{what} must be an integer >= {low}, got {value!r}."
        raise ConfigError(f"{msg} {why}".strip())
    return value
