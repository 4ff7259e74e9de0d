"""Layers that run a cell over time: one direction, both directions, a stack.

The fastrnns split: a cell is a step; :class:`RecurrentLayer` runs it forward
or reversed over a ``[batch, time, features]`` batch; :class:`BidirectionalLayer`
is two of those merged (concat | sum | mul | ave, as Keras' ``Bidirectional``);
:class:`CellStack` is TF's MultiRNNCell over whole sequences. The reversed
direction reverses each sequence *within its own length*
(``bidirectional_dynamic_rnn``), so it starts at the sequence's last real step
and padding never reaches outputs or final states.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rnnsearch.cells.base import RNNCell, State
from rnnsearch.errors import choice_error

MERGE_MODES = ("concat", "sum", "mul", "ave")


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse ``x`` ``[batch, time, ...]`` along time, each row within its first ``lengths[b]`` steps."""
    if lengths is None:
        return x.flip(1)
    steps = x.shape[1]
    t = torch.arange(steps, device=x.device).unsqueeze(0)  # (1, t)
    lengths = lengths.to(x.device).unsqueeze(1)  # (b, 1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)  # (b, t)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


def last_step(outputs: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``outputs[b, lengths[b] - 1]`` (the last real step) for each row; ``[batch, features]``."""
    if lengths is None:
        return outputs[:, -1]
    idx = (lengths.to(outputs.device) - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
    return outputs.gather(1, idx).squeeze(1)


class RecurrentLayer(nn.Module):
    """Runs one cell over time, forward or (per-sequence) reversed.

    Call arguments:
        x: ``[batch, time, input_size]``.
        lengths: optional ``[batch]`` int64 lengths.
        state: optional initial state (the cell's ``zero_state`` by default).

    Returns ``(outputs [batch, time, output_size], last_output [batch, output_size], final_state)``,
    outputs aligned with ``x`` in time whichever the direction.
    """

    def __init__(self, cell: RNNCell, reverse: bool = False) -> None:
        super().__init__()
        self.cell = cell
        self.reverse = reverse

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None,
                state: Optional[State] = None) -> tuple[Tensor, Tensor, State]:
        x = x.to(_device_of(self.cell, x))  # a device-wrapped cell may live elsewhere
        if self.reverse:
            x = reverse_padded(x, lengths)
        outputs, final = self.cell.forward_sequence(x, state, lengths)
        last = last_step(outputs, lengths)
        if self.reverse:
            outputs = reverse_padded(outputs, lengths)
        return outputs, last, final


def merge(a: Tensor, b: Tensor, mode: str) -> Tensor:
    """Combine forward and backward features."""
    if mode == "concat":
        return torch.cat([a, b], -1)
    if mode == "sum":
        return a + b
    if mode == "mul":
        return a * b
    if mode == "ave":
        return (a + b) * 0.5
    raise choice_error("merge_mode", mode, MERGE_MODES)


class BidirectionalLayer(nn.Module):
    """A forward and a reversed :class:`RecurrentLayer`, merged by ``merge_mode``."""

    def __init__(self, forward_cell: RNNCell, backward_cell: RNNCell, merge_mode: str = "concat") -> None:
        super().__init__()
        if merge_mode not in MERGE_MODES:
            raise choice_error("merge_mode", merge_mode, MERGE_MODES)
        self.fw = RecurrentLayer(forward_cell)
        self.bw = RecurrentLayer(backward_cell, reverse=True)
        self.merge_mode = merge_mode

    @property
    def output_size(self) -> int:
        n = self.fw.output_size
        return 2 * n if self.merge_mode == "concat" else n

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None,
                state: Optional[tuple[State, State]] = None) -> tuple[Tensor, Tensor, tuple[State, State]]:
        s_fw, s_bw = state if state is not None else (None, None)
        out_f, last_f, fin_f = self.fw(x, lengths, s_fw)
        out_b, last_b, fin_b = self.bw(x, lengths, s_bw)
        out_b, last_b = out_b.to(out_f.device), last_b.to(out_f.device)
        return merge(out_f, out_b, self.merge_mode), merge(last_f, last_b, self.merge_mode), (fin_f, fin_b)


def _device_of(module: nn.Module, default: Tensor) -> torch.device:
    for p in module.parameters():
        return p.device
    return default.device


class CellStack(nn.Module):
    """Layers applied in order (TF's MultiRNNCell over whole sequences).

    Returns ``(outputs of the last layer, its last-step output, final states, one per layer)``.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def output_size(self) -> int:
        return self.layers[-1].output_size

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None,
                states: Optional[list] = None) -> tuple[Tensor, Tensor, list]:
        finals = []
        last = x[:, -1]
        for k, layer in enumerate(self.layers):
            x, last, fin = layer(x, lengths, None if states is None else states[k])
            finals.append(fin)
        return x, last, finals
