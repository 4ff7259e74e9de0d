"""``rnn``: the basic (Elman) recurrent cell, TF's BasicRNNCell.

``h' = act(W_ih x + b_ih + W_hh h + b_hh)`` with ``act`` tanh or relu; the
parameters are named and shaped as ``torch.nn.RNNCell``'s, so weights move
between this cell and ``torch.nn.RNN`` (``nonlinearity=activation``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rnnsearch.errors import choice_error

from .base import RNNCell, State
from .functional import activation as get_activation
from .functional import init_uniform_
from .registry import register_cell


@register_cell("rnn")
class BasicRNNCell(RNNCell):
    """Elman RNN step.

    Args:
        input_size: features per step.
        hidden_size: state width.
        activation: ``tanh`` (default) or ``relu``.
    """

    options = ("activation",)
    batched_grad_methods = ("_step",)

    def __init__(self, input_size: int, hidden_size: int, activation: str = "tanh") -> None:
        super().__init__(input_size, hidden_size)
        if activation not in ("tanh", "relu"):
            raise choice_error("activation for cell 'rnn'", activation, ("tanh", "relu"))
        self.activation = activation
        self._act = get_activation(activation)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(hidden_size))
        init_uniform_(self, hidden_size)

    def project_input(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight_ih, self.bias_ih)  # (..., h)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh, self.bias_hh)

    def recurrent_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.weight_hh, self.bias_hh

    def recur_deferred(self, xp_t: Tensor, state: State, slot_t: Optional[Tensor] = None) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh.detach(), self.bias_hh.detach())

    def _step(self, xp_t: Tensor, state: State, weight_hh: Tensor, bias_hh: Optional[Tensor]) -> tuple[Tensor, State]:
        h = self._act(xp_t + torch.nn.functional.linear(state[0], weight_hh, bias_hh))
        return h, (h,)
