"""The fused path: a stack the cell registry describes, run by ``torch.nn.LSTM/GRU/RNN``.

When every layer is a built-in cell with options the fused modules have, the
only wrapper is non-variational output dropout, and both directions are
concatenated, the stack is exactly what one ``torch.nn`` recurrent module
computes (oneDNN on CPU, cuDNN on GPU). :func:`why_not_fusable` says why a
stack is not; :class:`FusedStack` runs one that is, with the same interface as
:class:`~rnnsearch.layers.CellStack`. TF's per-step ``forget_bias`` is folded
into the initial forget-gate bias (the same function, and the same gradients,
at every step; :func:`keep_folds_out_of_weight_decay` keeps weight decay from
shrinking that constant). Variable lengths go through packed sequences; packing needs
the lengths on the CPU, so pass a CPU ``lengths`` tensor (``Batch.cpu_lengths``)
to avoid a host–device sync, and a batch whose rows are all full length is not
packed at all. An empty sequence (length 0) gives zero outputs and keeps its
initial state, as on the cell path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnsearch.cells.gru import init_gate_bias_
from rnnsearch.errors import check_number


@dataclass
class LayerSpec:
    """One resolved layer of the stack: cell name and options, width, wrappers."""

    cell: str  # registry name
    options: dict[str, Any]  # cell options, without sizes
    hidden_size: int
    wrappers: list[dict[str, Any]] = field(default_factory=list)  # [{name: ..., **options}]


_DEFAULTS: dict[str, dict[str, Any]] = {
    "lstm": {"activation": "tanh", "use_peepholes": False, "cell_clip": None, "proj_clip": None, "variant": "vanilla"},
    "gru": {"activation": "tanh", "reset_after": True},
    "rnn": {},
}
_ALLOWED_EXTRA = {"lstm": {"forget_bias", "num_proj"}, "gru": {"gate_bias"}, "rnn": {"activation"}}


def _output_keep(wrappers: list[dict[str, Any]]) -> Optional[float]:
    """The output keep probability if wrappers are at most one plain output dropout, else None."""
    if not wrappers:
        return 1.0
    if len(wrappers) != 1:
        return None
    w = dict(wrappers[0])
    if w.pop("name", None) != "dropout":
        return None
    if w.pop("variational_recurrent", False):
        return None
    if float(w.pop("input_keep_prob", 1.0)) != 1.0 or float(w.pop("state_keep_prob", 1.0)) != 1.0:
        return None
    keep = float(w.pop("output_keep_prob", 1.0))
    return None if w else keep


def why_not_fusable(specs: list[LayerSpec], bidirectional: bool, merge_mode: str) -> Optional[str]:
    """None if ``torch.nn.LSTM/GRU/RNN`` computes this stack, else the reason it cannot."""
    first = specs[0]
    if first.cell not in _DEFAULTS:
        return f"cell {first.cell!r} has no fused torch.nn equivalent (only lstm, gru, rnn do)"
    for k, s in enumerate(specs):
        if s.cell != first.cell or s.options != first.options or s.hidden_size != first.hidden_size:
            return f"layer {k} differs from layer 0 (a fused module has one cell type and width)"
        if s.wrappers != first.wrappers:
            return f"layer {k} has other wrappers than layer 0"
        for key, value in s.options.items():
            if key in _ALLOWED_EXTRA[s.cell]:
                continue
            default = _DEFAULTS[s.cell].get(key, object())
            if value != default:
                return f"{s.cell} option {key}={value!r} is not supported by torch.nn.{s.cell.upper()}"
        if s.cell == "rnn" and s.options.get("activation", "tanh") not in ("tanh", "relu"):
            return "rnn activation must be tanh or relu"
    if _output_keep(first.wrappers) is None:
        return "wrappers other than plain (non-variational) output dropout run step by step"
    if bidirectional and merge_mode != "concat":
        return f"merge_mode={merge_mode!r} between layers (torch.nn concatenates directions)"
    return None


class FusedStack(nn.Module):
    """A whole stack as one ``torch.nn.LSTM/GRU/RNN`` (plus output dropout).

    Returns ``(outputs [b, t, out], last [b, out], finals)`` like CellStack;
    ``finals`` is torch's ``h_n`` (and ``c_n``) per layer.
    """

    def __init__(self, specs: list[LayerSpec], input_size: int, bidirectional: bool) -> None:
        super().__init__()
        spec = specs[0]
        self.kind = spec.cell
        self.num_layers = len(specs)
        self.bidirectional = bidirectional
        keep = _output_keep(spec.wrappers)
        assert keep is not None
        common = dict(input_size=input_size, hidden_size=spec.hidden_size, num_layers=len(specs),
                      batch_first=True, bidirectional=bidirectional, dropout=1.0 - keep if len(specs) > 1 else 0.0)
        if self.kind == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(proj_size=spec.options.get("num_proj") or 0, **common)
            self.forget_bias = float(spec.options.get("forget_bias", 1.0))
            with torch.no_grad():  # fold TF's constant forget bias into the initial bias
                for p, rows, value in self.folded_biases():
                    p[rows] += value
        elif self.kind == "gru":
            self.rnn = nn.GRU(**common)
            gate_bias = spec.options.get("gate_bias")
            if gate_bias is not None:  # as the cell path: TF's initial GRU biases
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        init_gate_bias_(p, getattr(self.rnn, name.replace("bias_ih", "bias_hh")), spec.hidden_size,
                                        check_number("gru gate_bias", gate_bias))
        else:
            self.rnn = nn.RNN(nonlinearity=spec.options.get("activation", "tanh"), **common)
        self.out_dropout = nn.Dropout(1.0 - keep) if keep < 1.0 else nn.Identity()
        width = (spec.options.get("num_proj") or spec.hidden_size) if self.kind == "lstm" else spec.hidden_size
        self.output_size = width * (2 if bidirectional else 1)

    def folded_biases(self) -> list[tuple[nn.Parameter, slice, float]]:
        """Where TF's constant forget bias sits inside trainable parameters: ``(parameter, rows, value)``."""
        if self.kind != "lstm" or self.forget_bias == 0.0:
            return []
        rows = slice(self.rnn.hidden_size, 2 * self.rnn.hidden_size)
        return [(p, rows, self.forget_bias) for n, p in self.rnn.named_parameters() if n.startswith("bias_ih")]

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None, states: Any = None) -> tuple[Tensor, Tensor, Any]:
        steps = x.shape[1]
        if lengths is not None and lengths.device.type == "cpu" and bool((lengths == steps).all()):
            lengths = None  # every row is full length: packing would change nothing
        empty = None
        if lengths is not None:
            cpu = lengths.cpu()
            if bool((cpu <= 0).any()):  # packing refuses empty rows: run them one step, then undo that step
                empty = (cpu <= 0).to(x.device, non_blocking=True)
                cpu = cpu.clamp(min=1)
            packed = pack(x, cpu)
            out, finals = self.rnn(packed, states)
            # unpack in sorted order and unsort on the device (torch's unsorting also reads indices to the CPU)
            out, _ = pad_packed_sequence(PackedSequence(out.data, out.batch_sizes), batch_first=True,
                                         total_length=steps)
            out = out.index_select(0, packed.unsorted_indices)
        else:
            out, finals = self.rnn(x, states)
        h_n = finals[0] if isinstance(finals, tuple) else finals  # (layers*dirs, b, out)
        last = torch.cat([h_n[-2], h_n[-1]], -1) if self.bidirectional else h_n[-1]
        if empty is not None:  # as the cell path: no output, the initial state kept
            out = out.masked_fill(empty.view(-1, 1, 1), 0.0)
            last = last.masked_fill(empty.view(-1, 1), 0.0)
            finals = _keep_initial(finals, states, empty)
        return self.out_dropout(out), self.out_dropout(last), finals


def _keep_initial(finals: Any, states: Any, empty: Tensor) -> Any:
    """``finals`` with the rows of empty sequences set back to the initial ``states`` (zeros when None)."""
    if isinstance(finals, tuple):
        initial = states if states is not None else (None,) * len(finals)
        return tuple(_keep_initial(f, s, empty) for f, s in zip(finals, initial))
    row = empty.view(1, -1, 1)  # finals are (layers*dirs, b, width)
    return finals.masked_fill(row, 0.0) if states is None else torch.where(row, states.to(finals.dtype), finals)


def pack(x: Tensor, lengths: Tensor) -> PackedSequence:
    """``pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)`` without a host–device sync.

    torch's version sorts on the CPU and then copies the permutation to the GPU
    with a blocking copy; here the copies are asynchronous. With ``lengths`` on
    the GPU, reading them to the CPU is the one sync left: pass CPU lengths.
    The packed sequence carries its (device) sort and unsort permutations.
    """
    cpu = lengths.cpu()
    sorted_lengths, order = torch.sort(cpu, descending=True)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(len(order))
    order_dev = order.to(x.device, non_blocking=True)
    packed = pack_padded_sequence(x.index_select(0, order_dev), sorted_lengths, batch_first=True, enforce_sorted=True)
    return PackedSequence(packed.data, packed.batch_sizes, order_dev, unsort.to(x.device, non_blocking=True))


def keep_folds_out_of_weight_decay(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Let weight decay see a fused LSTM's biases as the cell path's: without TF's folded forget bias.

    The fused path adds the constant ``forget_bias`` into the trainable ``bias_ih``; weight decay
    (AdamW's, or an L2 ``weight_decay`` of Adam/SGD/RMSprop) would then pull that constant towards 0,
    which the cell path, where it stays a constant, never does. So when the optimizer decays, each
    step takes the constant out before it and puts it back after (the gradient does not change).
    Returns how many parameters carry a fold (0: nothing registered). :func:`rnnsearch.train` calls it;
    call it yourself on an optimizer you build for a fused model.
    """
    folds = [f for m in model.modules() if isinstance(m, FusedStack) for f in m.folded_biases()]
    if not folds or not any(g.get("weight_decay", 0) for g in optimizer.param_groups):
        return 0

    def shift(sign: float) -> None:
        with torch.no_grad():
            for p, rows, value in folds:
                p[rows] += sign * value

    optimizer.register_step_pre_hook(lambda *_: shift(-1.0))
    optimizer.register_step_post_hook(lambda *_: shift(1.0))
    return len(folds)
