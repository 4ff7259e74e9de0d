"""Activation lookup and parameter initialisation shared by the built-in cells."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rnnsearch.errors import choice_error

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "softsign": torch.nn.functional.softsign,
    "identity": lambda t: t,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name``; an unknown name lists the valid ones."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise choice_error("activation", name, ACTIVATIONS) from None


def init_uniform_(module: nn.Module, hidden_size: int) -> None:
    """PyTorch's RNN initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
    k = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    for p in module.parameters(recurse=False):
        nn.init.uniform_(p, -k, k)


def clip(t: Tensor, value: float | None) -> Tensor:
    """Clip ``t`` to [-value, value] when ``value`` is set (TF's cell_clip / proj_clip)."""
    return t if value is None else t.clamp(-value, value)
