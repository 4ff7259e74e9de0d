"""``lstm``: TF's BasicLSTMCell and LSTMCell in one cell.

Gate order i, f, g, o and parameter names follow ``torch.nn.LSTM``
(``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``; ``weight_hr`` for the
projection), so a state_dict moves to a fused ``torch.nn.LSTM`` when the
options are ones it has. The step (TF ``rnn_cell_impl.py``)::

    i = σ(x_i + h_i [+ w_ci·c])          f = σ(x_f + h_f + forget_bias [+ w_cf·c])
    g = act(x_g + h_g)                   c' = clip(f·c + i·g, cell_clip)
    o = σ(x_o + h_o [+ w_co·c'])         m = o·act(c')
    h' = clip(m W_hr^T, proj_clip) if num_proj else m

``forget_bias`` is a constant added at every step, not an initialiser (TF
BasicLSTMCell). State is ``(h, c)`` in PyTorch's order, ``h`` of width
``num_proj`` when projecting.

Where the compiled path runs on a CPU (``model.compile``), an ``lstm`` without projection, in any variant,
runs a hand-written fused kernel instead (:mod:`rnnsearch.cells.lstm_kernel`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from rnnsearch.errors import ConfigError, check_bool, check_number, check_positive_int, check_positive_number

from . import lstm_kernel
from .base import RNNCell, State
from .functional import activation as get_activation
from .functional import clip, init_uniform_
from .lstm_variants import check_variant, gate_names, variant_step
from .registry import register_cell


def check_forget_bias(value: object) -> float:
    """forget_bias must be a finite number."""
    return check_number("forget_bias", value, " (TF's default is 1.0)")


def check_clip(name: str, value: object) -> Optional[float]:
    """A clip value is null (no clipping) or a positive number."""
    return None if value is None else check_positive_number(name, value, " or null (no clipping)")


@register_cell("lstm")
class LSTMCell(RNNCell):
    """Long short-term memory step with TF 1.x options.

    Args:
        input_size: features per step.
        hidden_size: units of the cell state ``c``.
        forget_bias: added to the forget-gate pre-activation at every step (default 1.0).
        activation: of the candidate and of the cell output (``tanh``).
        use_peepholes: diagonal peephole weights ``weight_ci``, ``weight_cf``, ``weight_co``.
        cell_clip: clip ``c`` to ``[-cell_clip, cell_clip]`` (null: no clip).
        num_proj: project the output to this width (``weight_hr``); null: no projection.
        proj_clip: clip the projected output (needs ``num_proj``).
        variant: ``vanilla`` (default) or one of Greff et al.'s eight variants
            (NIG, NFG, NOG, NIAF, NOAF, NP, CIFG, FGR; see :mod:`rnnsearch.cells.lstm_variants`).
    """

    options = ("forget_bias", "activation", "use_peepholes", "cell_clip", "num_proj", "proj_clip", "variant")
    batched_grad_methods = ("_step",)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        forget_bias: float = 1.0,
        activation: str = "tanh",
        use_peepholes: bool = False,
        cell_clip: Optional[float] = None,
        num_proj: Optional[int] = None,
        proj_clip: Optional[float] = None,
        variant: str = "vanilla",
    ) -> None:
        super().__init__(input_size, hidden_size)
        self.forget_bias = check_forget_bias(forget_bias)
        self.activation = activation
        self._act = get_activation(activation)
        self.use_peepholes = check_bool("lstm use_peepholes", use_peepholes)
        self.cell_clip = check_clip("cell_clip", cell_clip)
        self.num_proj = None if num_proj is None else check_positive_int("num_proj", num_proj)
        self.proj_clip = check_clip("proj_clip", proj_clip)
        if self.proj_clip is not None and self.num_proj is None:
            raise ConfigError(f"proj_clip={proj_clip!r} needs num_proj to be set (it clips the projection).")
        self.variant = check_variant(variant, self.use_peepholes)
        self.gates = gate_names(self.variant)
        rows = len(self.gates) * hidden_size
        out = self.num_proj or hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size))
        self.weight_hh = nn.Parameter(torch.empty(rows, out))
        self.bias_ih = nn.Parameter(torch.empty(rows))
        self.bias_hh = nn.Parameter(torch.empty(rows))
        if self.use_peepholes:
            for g in ("i", "f", "o"):
                if g in self.gates:
                    setattr(self, f"weight_c{g}", nn.Parameter(torch.empty(hidden_size)))
        if self.variant == "FGR":  # previous [i, f, o] activations -> each gate
            self.weight_gr = nn.Parameter(torch.empty(3 * hidden_size, 3 * hidden_size))
        if self.num_proj is not None:
            self.weight_hr = nn.Parameter(torch.empty(self.num_proj, hidden_size))
        init_uniform_(self, hidden_size)

    @property
    def output_size(self) -> int:
        return self.num_proj or self.hidden_size

    @property
    def state_size(self) -> tuple[int, ...]:
        extra = (3 * self.hidden_size,) if self.variant == "FGR" else ()
        return (self.num_proj or self.hidden_size, self.hidden_size, *extra)

    def project_input(self, x: Tensor) -> Tensor:
        return linear(x, self.weight_ih, self.bias_ih)  # (..., 4h)

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        return lstm_kernel.applies(self, device_type, dtype, amp, steps)

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        return lstm_kernel.forward_sequence(self, x, state, lengths)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh, self.bias_hh)

    def recurrent_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        return self.weight_hh, self.bias_hh

    def recur_deferred(self, xp_t: Tensor, state: State, slot_t: Optional[Tensor] = None) -> tuple[Tensor, State]:
        return self._step(xp_t, state, self.weight_hh.detach(), self.bias_hh.detach())

    def _step(self, xp_t: Tensor, state: State, weight_hh: Tensor, bias_hh: Optional[Tensor]) -> tuple[Tensor, State]:
        if self.variant != "vanilla":
            return variant_step(self, xp_t, state, weight_hh, bias_hh)
        h, c = state
        gates = xp_t + linear(h, weight_hh, bias_hh)  # (b, 4h)
        i, f, g, o = gates.chunk(4, 1)
        if self.use_peepholes:
            i = i + self.weight_ci * c
            f = f + self.weight_cf * c
        if self.forget_bias != 0.0:
            f = f + self.forget_bias
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * self._act(g)
        c_new = clip(c_new, self.cell_clip)
        if self.use_peepholes:
            o = o + self.weight_co * c_new
        m = torch.sigmoid(o) * self._act(c_new)
        if self.num_proj is not None:
            m = clip(linear(m, self.weight_hr), self.proj_clip)
        return m, (m, c_new)
