"""Cell wrappers: ``dropout``, ``residual``, ``device``, ``zoneout``.

A wrapper is itself an :class:`RNNCell` around another cell, so wrappers
compose in config order (the first in ``model.wrappers`` wraps the cell, the
next wraps that). They keep the inner cell's hoisted input projection, so a
wrapped cell stays as fast as a bare one. Semantics follow TF 1.x
``rnn_cell_impl.py`` (DropoutWrapper, ResidualWrapper, DeviceWrapper) and
Krueger et al. 2016 for zoneout. Each is identity-free of randomness at eval.

A wrapper that acts on a sequence's inputs and outputs only (``dropout`` without state dropout,
``residual``, ``device``) also runs a whole training sequence through the wrapped cell's fused kernel
(``kernel_sequence``) where that cell has one, applying itself before and after. ``zoneout`` and state dropout
act inside the recurrence: around a bare ``lstm`` or ``ln_lstm`` its kernel zones, or drops, the state itself;
around anything else the step loop runs. A subclass that redefines a step method (``project_input``, ``recur``,
``start_sequence``) runs the step loop too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from rnnsearch.errors import ConfigError, check_bool, check_keep_prob
from rnnsearch.registry import Registry, check_options

from . import ln_lstm_kernel, lstm_kernel
from .base import RNNCell, State, _owner, step_masks
from .ln_lstm import LayerNormLSTMCell

WRAPPERS: Registry[type["CellWrapper"]] = Registry(
    "wrapper", entry_point_group="rnnsearch.wrappers",
    check=lambda obj: None if isinstance(obj, type) and issubclass(obj, CellWrapper) else
    "a wrapper must be a class derived from rnnsearch.cells.wrappers.CellWrapper.")


def register_wrapper(name: str, *, replace: bool = False) -> Callable[[Any], Any]:
    """Class decorator adding a wrapper under ``name`` (usable in ``model.wrappers``)."""
    return WRAPPERS.register(name, replace=replace)


def list_wrappers(pattern: str = "*") -> list[str]:
    """Registered wrapper names."""
    return WRAPPERS.names(pattern)


def create_wrapper(name: str, cell: RNNCell, **options: Any) -> "CellWrapper":
    """Wrap ``cell`` in the wrapper registered as ``name``."""
    cls = WRAPPERS.get(name)
    check_options("wrapper", name, cls.__init__, options, skip=("self", "cell"))
    return cls(cell, **options)


class CellWrapper(RNNCell):
    """Base of wrappers: delegates sizes, state and the step to ``self.cell``."""

    def __init__(self, cell: RNNCell) -> None:
        super().__init__(cell.input_size, cell.hidden_size)
        self.cell = cell

    @property
    def compile_projection(self) -> bool:  # type: ignore[override]
        return self.cell.compile_projection

    @compile_projection.setter
    def compile_projection(self, value: bool) -> None:
        self.cell.compile_projection = value

    @property
    def output_size(self) -> int:
        return self.cell.output_size

    @property
    def output_is_state(self) -> Optional[bool]:
        return self.cell.output_is_state

    @property
    def state_size(self) -> tuple[int, ...]:
        return self.cell.state_size

    def zero_state(self, batch_size: int, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device | str] = None) -> State:
        return self.cell.zero_state(batch_size, dtype=dtype, device=device)

    def start_sequence(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cell.start_sequence(batch_size, device, dtype)

    def project_input(self, x: Tensor) -> Tensor:
        return self.cell.project_input(x)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        return self.cell.recur(xp_t, state)

    def acts_outside_recurrence(self) -> bool:
        """Whether the wrapper now acts on a sequence's inputs and outputs only (then ``kernel_sequence`` may run)."""
        return False

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        # only a wrapper class that writes its own kernel_sequence, with the step methods it was written for
        cls, owner = type(self), _owner(type(self), "kernel_sequence")
        return (owner is not RNNCell and self.acts_outside_recurrence()
                and all(_owner(cls, m) is _owner(owner, m) for m in ("project_input", "recur", "start_sequence"))
                and self.cell.kernel_applies(device_type, dtype, amp, steps))

    def _state_kernel_runs_me(self, own: type["CellWrapper"], methods: tuple[str, ...], device_type: str,
                              dtype: torch.dtype, amp: Optional[torch.dtype], steps: int) -> bool:
        """Whether the bare cell's kernel (``lstm``'s, ``ln_lstm``'s) can do this wrapper's work inside the
        recurrence (zoneout, state dropout).

        A bare ``lstm`` or ``ln_lstm`` inside, whose kernel applies, and ``own``'s versions of ``methods`` (the step
        methods and helpers the kernel reproduces): a subclass that redefines one runs the step loop.
        """
        cls = type(self)
        return (all(_owner(cls, m) is _owner(own, m)
                    for m in ("project_input", "recur", "start_sequence", "kernel_sequence", *methods))
                and self.cell.kernel_applies(device_type, dtype, amp, steps)
                and _kernel_of(self.cell).applies(self.cell, device_type, dtype, amp, steps))


def _kernel_of(cell: RNNCell) -> Any:
    """The kernel module of a bare cell: ``ln_lstm_kernel`` for an ``ln_lstm``, else ``lstm_kernel`` (whose
    ``applies`` is False, and ``forward_sequence`` None, for a cell it does not run)."""
    return ln_lstm_kernel if isinstance(cell, LayerNormLSTMCell) else lstm_kernel


def _mask(shape: tuple[int, ...], keep: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Inverted-dropout mask: 1/keep with probability keep, else 0."""
    return (torch.rand(shape, device=device) < keep).to(dtype) / keep  # out of place: see ZoneoutWrapper._zone


@register_wrapper("dropout")
class DropoutWrapper(CellWrapper):
    """TF's DropoutWrapper: input dropout → cell → state dropout → output dropout.

    Args:
        cell: the wrapped cell.
        input_keep_prob: keep probability of each input unit.
        output_keep_prob: keep probability of each output unit.
        state_keep_prob: keep probability of the state passed to the next step;
            only the first state tensor (``h``) is dropped, never an LSTM's ``c``
            (TF's default state filter).
        variational_recurrent: draw one mask per sequence and reuse it at every
            step (Gal & Ghahramani 2016) instead of a new mask each step.

    At eval time (``module.eval()``) the wrapper is the identity.
    """

    options = ("input_keep_prob", "output_keep_prob", "state_keep_prob", "variational_recurrent")

    def __init__(self, cell: RNNCell, input_keep_prob: float = 1.0, output_keep_prob: float = 1.0,
                 state_keep_prob: float = 1.0, variational_recurrent: bool = False) -> None:
        super().__init__(cell)
        self.input_keep_prob = check_keep_prob("dropout input_keep_prob", input_keep_prob)
        self.output_keep_prob = check_keep_prob("dropout output_keep_prob", output_keep_prob)
        self.state_keep_prob = check_keep_prob("dropout state_keep_prob", state_keep_prob)
        self.variational_recurrent = check_bool("dropout variational_recurrent", variational_recurrent)
        self._masks: dict[str, Tensor] = {}

    def start_sequence(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        super().start_sequence(batch_size, device, dtype)
        self._masks = {}
        if self.variational_recurrent and self.training:
            for key, keep, width in (("input", self.input_keep_prob, self.input_size),
                                     ("state", self.state_keep_prob, self.state_size[0]),
                                     ("output", self.output_keep_prob, self.output_size)):
                if keep < 1.0:
                    self._masks[key] = _mask((batch_size, width), keep, device, dtype)

    def _drop(self, key: str, t: Tensor, keep: float) -> Tensor:
        if keep >= 1.0 or not self.training:
            return t
        if not self.variational_recurrent:
            return torch.nn.functional.dropout(t, 1.0 - keep, training=True)
        mask = self._masks.get(key)
        if mask is None or mask.shape[0] != t.shape[0]:  # stepping by hand without start_sequence
            mask = self._masks[key] = _mask((t.shape[0], t.shape[-1]), keep, t.device, t.dtype)
        return t * (mask.unsqueeze(1) if t.dim() == 3 else mask)

    @property
    def output_is_state(self) -> Optional[bool]:
        if self.output_keep_prob < 1.0 or self.state_keep_prob < 1.0:
            return False  # two different draws in training (the identity in eval)
        return self.cell.output_is_state

    def project_input(self, x: Tensor) -> Tensor:
        return self.cell.project_input(self._drop("input", x, self.input_keep_prob))

    def acts_outside_recurrence(self) -> bool:
        return self.state_keep_prob >= 1.0 or not self.training

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        if self.acts_outside_recurrence():
            return super().kernel_applies(device_type, dtype, amp, steps)
        # state dropout: around a bare lstm or ln_lstm, its kernel drops the state it passes on itself
        return self._state_kernel_runs_me(DropoutWrapper, ("_drop",), device_type, dtype, amp, steps)

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        # the step loop's draws, on the whole sequence: dropout's masks are independent per step and unit anyway
        xd = self._drop("input", x, self.input_keep_prob)
        if self.acts_outside_recurrence():
            result = self.cell.kernel_sequence(xd, state, lengths)
        else:
            result = _kernel_of(self.cell).forward_sequence(
                self.cell, xd, state, lengths, state_dropout=self._state_multipliers(x.shape[1], x.shape[0]))
        if result is None:
            return None
        return self._drop("output", result[0], self.output_keep_prob), result[1]  # padding stays zero

    def _state_multipliers(self, steps: int, batch: int) -> Tensor:
        """State dropout's ``(T, B, H)`` multipliers of the ``h`` passed on: 0 or 1 / keep (the kernel route)."""
        keep, width = self.state_keep_prob, self.state_size[0]
        mask = self._masks.get("state") if self.variational_recurrent else None  # drawn in start_sequence
        if mask is not None and mask.shape[0] == batch:
            return mask.to(torch.float32).expand(steps, batch, width)
        kept, _ = ln_lstm_kernel.zoneout_draws((steps, batch, width), keep, 0.0)  # 1 with probability keep
        return kept / keep

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        out, new_state = self.cell.recur(xp_t, state)
        if self.state_keep_prob < 1.0:
            new_state = (self._drop("state", new_state[0], self.state_keep_prob),) + tuple(new_state[1:])
        return self._drop("output", out, self.output_keep_prob), new_state


@register_wrapper("residual")
class ResidualWrapper(CellWrapper):
    """TF's ResidualWrapper: ``output = input + cell_output`` (widths must match)."""

    def __init__(self, cell: RNNCell) -> None:
        super().__init__(cell)
        if cell.input_size != cell.output_size:
            raise ConfigError(
                f"The residual wrapper adds a layer's input to its output, but this layer's input has "
                f"{cell.input_size} features and its output {cell.output_size}. Make them equal (e.g. put "
                f"residual only on layers whose input is hidden_size wide, use merge_mode=sum|ave|mul for "
                f"bidirectional stacks, or drop num_proj)."
            )

    @property
    def output_is_state(self) -> Optional[bool]:
        return False  # input + output; the state is the inner cell's

    def project_input(self, x: Tensor) -> Tensor:
        return torch.cat([self.cell.project_input(x), x], -1)  # (..., projected + input)

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        inner, x_t = xp_t[:, : -self.input_size], xp_t[:, -self.input_size :]
        out, new_state = self.cell.recur(inner, state)
        return x_t + out, new_state

    def acts_outside_recurrence(self) -> bool:
        return True

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        result = self.cell.kernel_sequence(x, state, lengths)
        if result is None:
            return None
        out = x + result[0]
        if lengths is not None:  # as the step loop: padding outputs zero, a select (NaN padding stays out)
            out = out.masked_fill(~step_masks(lengths, x.shape[1], out.device).transpose(0, 1), 0.0)
        return out, result[1]


@register_wrapper("device")
class DeviceWrapper(CellWrapper):
    """TF's DeviceWrapper: keeps the wrapped cell (and its state) on ``device``.

    Inputs and states are moved there before each step; outputs stay there (the
    next layer, or the model's head, moves them on). ``model.to(...)`` does not
    move a device-wrapped cell off its device. Use it for model parallelism:
    put the layers of a deep stack on different GPUs.
    """

    options = ("device",)

    def __init__(self, cell: RNNCell, device: str = "cpu") -> None:
        super().__init__(cell)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"device wrapper: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'.") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ConfigError(
                f"device wrapper: {device!r} is not available here ({torch.cuda.device_count()} CUDA device(s)); "
                f"use 'cpu' or an existing 'cuda:N'."
            )
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.cell.to(dev)

    def _apply(self, fn: Any, recurse: bool = True) -> "DeviceWrapper":
        # Keep the cell pinned without a round trip through the other device: ``fn``
        # applies as is when it leaves a tensor here (dtype casts, share_memory_);
        # when it moves tensors elsewhere (model.to/cuda/cpu) only its dtype change applies.
        ref = next((p for p in self.cell.parameters() if p.is_floating_point()), None)
        probe = fn(torch.zeros((), device=self.device, dtype=torch.float32 if ref is None else ref.dtype))
        if probe.device == self.device:
            return super()._apply(fn, recurse)
        if ref is not None and probe.dtype != ref.dtype:
            self.cell.to(dtype=probe.dtype)
        return self

    def zero_state(self, batch_size: int, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device | str] = None) -> State:
        return self.cell.zero_state(batch_size, dtype=dtype, device=self.device)

    def start_sequence(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.cell.start_sequence(batch_size, self.device, dtype)

    def project_input(self, x: Tensor) -> Tensor:
        return self.cell.project_input(x.to(self.device))

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        return self.cell.recur(xp_t, tuple(s.to(self.device) for s in state))

    def acts_outside_recurrence(self) -> bool:
        return True

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        return super().kernel_applies(self.device.type, dtype, amp, steps)  # the cell runs on its own device

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        return self.cell.kernel_sequence(x.to(self.device), tuple(s.to(self.device) for s in state), lengths)


@register_wrapper("zoneout")
class ZoneoutWrapper(CellWrapper):
    """Zoneout (Krueger et al. 2016): each state unit keeps its previous value with some probability.

    Args:
        cell: the wrapped cell.
        h_prob: zoneout probability of the first state tensor (``h``); the paper uses 0.05.
        c_prob: zoneout probability of the other state tensors (an LSTM's ``c``); the paper uses 0.5.

    Training: ``s' = d·s + (1 - d)·s_new`` with ``d ~ Bernoulli(p)`` per unit and step.
    Eval: the expectation, ``s' = p·s + (1 - p)·s_new``. The output is the zoned ``h``
    when the wrapped cell outputs its ``h`` (``output_is_state``; a plain cell: its output is its new
    ``h``). Around a dropout wrapper with output or state dropout, or a residual one, the output is the
    wrapped cell's own and only the state is zoned, in training and eval alike (wrap the zoneout cell in
    dropout instead, ``[zoneout, dropout]``, to drop a zoned output).
    """

    options = ("h_prob", "c_prob")

    def __init__(self, cell: RNNCell, h_prob: float = 0.05, c_prob: float = 0.5) -> None:
        super().__init__(cell)
        for name, p in (("h_prob", h_prob), ("c_prob", c_prob)):
            if not (isinstance(p, (int, float)) and 0.0 <= float(p) < 1.0):
                raise ConfigError(f"zoneout {name} must be a probability in [0, 1), got {p!r}.")
        self.h_prob = float(h_prob)
        self.c_prob = float(c_prob)

    def _zone(self, old: Tensor, new: Tensor, p: float) -> Tensor:
        if p == 0.0:
            return new
        if self.training:
            # drawn out of place: torch.compile (2.13, CPU) ran an in-place bernoulli_ on a fresh buffer after the
            # kernel that read it, giving NaN; a comparison with uniform noise compiles correctly
            keep_old = (torch.rand_like(new, dtype=torch.float32) < p).to(new.dtype)
            return torch.lerp(new, old, keep_old)
        return torch.lerp(new, old, p)

    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        # around a bare lstm (not FGR, whose third state the kernel would not zone) or ln_lstm, its kernel zones the
        # state
        return (self._state_kernel_runs_me(ZoneoutWrapper, ("_zone",), device_type, dtype, amp, steps)
                and getattr(self.cell, "variant", None) != "FGR")

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        return _kernel_of(self.cell).forward_sequence(self.cell, x, state, lengths,
                                                      zoneout=(self.h_prob, self.c_prob, self.training))

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        out, new_state = self.cell.recur(xp_t, state)
        zoned = tuple(self._zone(o, n, self.h_prob if k == 0 else self.c_prob)
                      for k, (o, n) in enumerate(zip(state, new_state)))
        same = self.cell.output_is_state
        if same is None:  # a plain cell: is its output its new h?
            same = self.cell.output_size == self.state_size[0] and out is new_state[0]
        if same:
            out = zoned[0]
        return out, zoned
