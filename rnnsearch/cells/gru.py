"""``gru``: the gated recurrent unit, in both published forms.

Gate order r, z, n and parameter names follow ``torch.nn.GRU``.

* ``reset_after=True`` (default; PyTorch / cuDNN / Keras ``reset_after``):
  ``n = act(W_in x + b_in + r * (W_hn h + b_hn))``.
* ``reset_after=False`` (TF 1.x ``GRUCell``, Cho et al. 2014): the reset gate
  scales ``h`` *before* the candidate matmul, ``n = act(W_in x + b_in + W_hn (r * h) + b_hn)``.

Both end with ``h' = (1 - z) * n + z * h`` (TF writes ``u * h + (1 - u) * c``).

Initialisation: PyTorch's (every weight and bias ~ U(-1/√H, 1/√H)), unless ``gate_bias`` is set: the reset
and update gates' biases then start at that value and the candidate's at zero, TF 1.x ``GRUCell``'s
default with ``gate_bias: 1.0`` (its gate bias starts at 1.0; see the project's REFERENCE notes).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from rnnsearch.errors import check_bool, check_number

from .base import RNNCell, State
from .functional import activation as get_activation
from .functional import init_uniform_
from .registry import register_cell


def init_gate_bias_(bias_ih: Tensor, bias_hh: Tensor, hidden_size: int, value: float) -> None:
    """TF-style GRU biases (rows r, z, n): the gates' effective bias ``value``, the candidate's zero."""
    with torch.no_grad():
        bias_ih.zero_()
        bias_hh.zero_()
        bias_ih[: 2 * hidden_size] = value


@register_cell("gru")
class GRUCell(RNNCell):
    """GRU step.

    Args:
        input_size: features per step.
        hidden_size: state width.
        reset_after: apply the reset gate after (PyTorch) or before (TF) the recurrent matmul.
        activation: candidate activation, ``tanh`` by default.
        gate_bias: None (PyTorch's uniform bias initialisation), or the initial bias of the reset and update
            gates, the candidate's then starting at zero (1.0: TF 1.x ``GRUCell``'s default).
    """

    options = ("reset_after", "activation", "gate_bias")

    def __init__(self, input_size: int, hidden_size: int, reset_after: bool = True, activation: str = "tanh",
                 gate_bias: Optional[float] = None) -> None:
        super().__init__(input_size, hidden_size)
        self.reset_after = check_bool("gru reset_after", reset_after)
        self.activation = activation
        self._act = get_activation(activation)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))
        init_uniform_(self, hidden_size)
        self.gate_bias = None if gate_bias is None else check_number("gru gate_bias", gate_bias)
        if self.gate_bias is not None:
            init_gate_bias_(self.bias_ih, self.bias_hh, hidden_size, self.gate_bias)

    def project_input(self, x: Tensor) -> Tensor:
        return linear(x, self.weight_ih, self.bias_ih)  # (..., 3h)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        h = state[0]
        H = self.hidden_size
        xr, xz, xn = xp_t.chunk(3, 1)
        if self.reset_after:
            hr, hz, hn = linear(h, self.weight_hh, self.bias_hh).chunk(3, 1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = self._act(xn + r * hn)
        else:
            hrz = linear(h, self.weight_hh[: 2 * H], self.bias_hh[: 2 * H])
            hr, hz = hrz.chunk(2, 1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = self._act(xn + linear(r * h, self.weight_hh[2 * H :], self.bias_hh[2 * H :]))
        h_new = (1.0 - z) * n + z * h
        return h_new, (h_new,)
