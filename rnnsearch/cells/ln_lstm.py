"""``ln_lstm``: layer-normalised LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", sec. 3.1).

Input and recurrent gate pre-activations are normalised separately, the cell
state once more before the output activation::

    gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b        (gate order i, f, g, o)
    c' = σ(f + forget_bias)·c + σ(i)·tanh(g)
    h' = σ(o)·tanh(LN_c(c'))

Each gate block is normalised on its own, as in TF contrib's ``LayerNormBasicLSTMCell``
(whose built-in dropout is left to the ``dropout`` wrapper). A training sequence computes
``weight_hh``'s gradient in one GEMM after the loop, through the batched gradient's slot route
(:mod:`rnnsearch.cells.batched_grad`). Where the compiled path runs, a float32 CPU training sequence
runs a hand-written fused kernel instead (:mod:`rnnsearch.cells.ln_lstm_kernel`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.functional import layer_norm, linear

from rnnsearch.errors import check_positive_number

from . import ln_lstm_kernel
from .base import RNNCell, State
from .batched_grad import add_slot
from .functional import init_uniform_
from .lstm import check_forget_bias
from .registry import register_cell


@register_cell("ln_lstm")
class LayerNormLSTMCell(RNNCell):
    """LSTM step with layer normalisation.

    Args:
        input_size: features per step.
        hidden_size: units of the cell state.
        forget_bias: added to the forget-gate pre-activation at every step (default 1.0).
        eps: layer-norm epsilon.
    """

    options = ("forget_bias", "eps")
    compile_projection = True  # the input layer norm fuses into the compiled chunk (rnnsearch.compile)
    batched_grad_slot = True  # weight_hh's gradient in one GEMM per sequence (rnnsearch.cells.batched_grad)
    batched_grad_methods = ("_step",)  # whatever follows the product (_ln4 too), the slot route holds

    def __init__(self, input_size: int, hidden_size: int, forget_bias: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__(input_size, hidden_size)
        self.forget_bias = check_forget_bias(forget_bias)
        self.eps = check_positive_number("ln_lstm eps", eps)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        init_uniform_(self, hidden_size)
        self.ln_ih_weight = nn.Parameter(torch.ones(4 * hidden_size))
        self.ln_hh_weight = nn.Parameter(torch.ones(4 * hidden_size))
        self.ln_c_weight = nn.Parameter(torch.ones(hidden_size))
        self.ln_c_bias = nn.Parameter(torch.zeros(hidden_size))

    @property
    def state_size(self) -> tuple[int, ...]:
        return (self.hidden_size, self.hidden_size)

    def _ln4(self, t: Tensor, weight: Tensor) -> Tensor:
        # normalise each gate's block on its own, as in Ba et al.
        shape = t.shape
        t = layer_norm(t.reshape(*shape[:-1], 4, self.hidden_size), (self.hidden_size,), eps=self.eps)
        return t.reshape(shape) * weight

    def project_input(self, x: Tensor) -> Tensor:
        return self._ln4(linear(x, self.weight_ih), self.ln_ih_weight) + self.bias  # (..., 4h)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh, None)

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        return ln_lstm_kernel.applies(self, device_type, dtype, amp, steps)

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        return ln_lstm_kernel.forward_sequence(self, x, state, lengths)

    def recurrent_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.weight_hh, None

    def recur_deferred(self, xp_t: Tensor, state: State, slot_t: Optional[Tensor] = None) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh.detach(), slot_t)

    def _step(self, xp_t: Tensor, state: State, weight_hh: Tensor, slot_t: Optional[Tensor]) -> tuple[Tensor, State]:
        h, c = state
        gates = xp_t + self._ln4(add_slot(linear(h, weight_hh), slot_t), self.ln_hh_weight)
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f + self.forget_bias) * c + torch.sigmoid(i) * torch.tanh(g)
        c_norm = layer_norm(c_new, (self.hidden_size,), self.ln_c_weight, self.ln_c_bias, self.eps)
        h_new = torch.sigmoid(o) * torch.tanh(c_norm)
        return h_new, (h_new, c_new)
