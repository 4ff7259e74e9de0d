"""The base class every recurrent cell derives from.

A cell is a pure step function ``forward(x_t, state) -> (output_t, new_state)``
(the contract of TF's ``RNNCell`` and Keras' cells). The state is a tuple of
tensors whose sizes ``state_size`` lists; ``zero_state`` builds it.
``forward_sequence`` runs the cell over a ``[batch, time, features]`` tensor with
optional per-sequence lengths, following ``tf.nn.dynamic_rnn``: outputs past a
sequence's length are zero and its last valid state is carried through.
Cells with a cheaper sequence form (e.g. hoisting the input projection out of
the loop) override :meth:`RNNCell.forward_sequence`. The time loop itself is
:func:`run_steps`; :mod:`rnnsearch.compile` may install a compiled runner of it
on a cell (``cell.sequence_runner``), which ``forward_sequence`` then calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .batched_grad import BatchedRecurrentGrad, FirstOrderOnly, Holder, wants_batched_grad, zero_slot

State = tuple[Tensor, ...]


class RNNCell(nn.Module):
    """Base class of every rnnsearch cell.

    Args:
        input_size: features of ``x_t``.
        hidden_size: units of the recurrent state.

    Subclasses set ``output_size`` and ``state_size`` when they differ from the
    defaults (``hidden_size`` and ``(hidden_size,)``) and implement ``forward``.

    Call arguments (``forward``):
        x_t: ``[batch, input_size]``.
        state: tuple of ``[batch, state_size[i]]`` tensors.

    Example:
        >>> cell = create_cell("gru", input_size=3, hidden_size=8)
        >>> out, state = cell(torch.zeros(2, 3), cell.zero_state(2))
    """

    #: Options a config may set, besides input_size/hidden_size (filled by subclasses).
    options: tuple[str, ...] = ()

    #: Whether a training sequence may compute the recurrent weight's gradient in one GEMM after the
    #: loop, for cells that opt in (see ``recurrent_weights``); set False on a cell to get the plain
    #: per-step autograd (an ablation, or to debug a new cell).
    batched_weight_grad: bool = True
    #: Further methods the batched route relies on (besides ``recur``/``recur_deferred``): a subclass
    #: that redefines any of them takes the plain loop, since its step may no longer fit the contract.
    batched_grad_methods: tuple[str, ...] = ()
    #: Whether the batched route passes the cell a zero slot to add to its recurrent product (a cell whose
    #: product is not added straight to ``xp_t``, e.g. normalised first; see rnnsearch.cells.batched_grad).
    #: Part of ``recur_deferred``'s contract, not a switch: read from the class that defines
    #: ``recur_deferred`` (use ``batched_weight_grad`` to turn the batched route off).
    batched_grad_slot: bool = False
    #: Whether a compiled loop (rnnsearch.compile) projects each chunk's inputs inside its graph instead of
    #: the whole sequence before the loop: worth it when ``project_input`` does elementwise work beyond a
    #: matmul (``ln_lstm``'s layer norm) that then fuses with the steps'; it costs a stack one more compiled
    #: graph (the first layer's input width differs). Ignored on the batched weight gradient's ``xp`` route
    #: (it needs the whole sequence's projection), kept on its slot route.
    compile_projection: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _check_step_override(cls)

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)

    @property
    def output_size(self) -> int:
        """Width of each step's output."""
        return self.hidden_size

    @property
    def state_size(self) -> tuple[int, ...]:
        """Width of each state tensor, in state order."""
        return (self.hidden_size,)

    @property
    def output_is_state(self) -> Optional[bool]:
        """Whether each step's output *is* its new first state tensor (``h``), in training and eval alike.

        None (a plain cell): not declared; :class:`~rnnsearch.cells.wrappers.ZoneoutWrapper` then checks each
        step's tensors by identity. Wrappers declare it (output or state dropout, a residual: False), so a
        wrapper's train-time randomness cannot change the answer between training and eval.
        """
        return None

    def _reference(self) -> Tensor:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return torch.empty(0)

    def zero_state(
        self, batch_size: int, dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None
    ) -> State:
        """All-zero initial state: one ``[batch_size, n]`` tensor per entry of ``state_size``."""
        ref = self._reference()
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
        device = device if device is not None else ref.device
        return tuple(torch.zeros(batch_size, n, dtype=dtype, device=device) for n in self.state_size)

    def start_sequence(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Called once before a sequence is run; wrappers draw per-sequence masks here."""

    # A cell overrides either ``forward`` alone (the simple way), or the pair
    # ``project_input`` + ``recur``: the input projection is then computed for
    # all time steps in one matmul before the loop (fastrnns' hoisting), and the
    # loop does only the recurrent part.
    def project_input(self, x: Tensor) -> Tensor:
        """Time-independent part of a step, applied to ``[..., input_size]`` (identity by default)."""
        return x

    def recur(self, xp_t: Tensor, state: State) -> tuple[Tensor, State]:
        """One step given the projected input ``xp_t``; defaults to ``forward``."""
        if type(self).forward is RNNCell.forward:
            raise NotImplementedError(f"{type(self).__name__} must implement forward() or project_input()+recur()")
        return self.forward(xp_t, state)

    def forward(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """One step: ``x_t`` ``[batch, input_size]`` → ``(output [batch, output_size], new_state)``."""
        return self.recur(self.project_input(x_t), state)

    # Optional, for speed (rnnsearch.cells.batched_grad): a cell whose step adds
    # ``linear(state[0], W, b)`` to ``xp_t`` (and uses W, b nowhere else), and whose
    # output is the new ``state[0]``, returns ``(W, b)`` here and implements
    # ``recur_deferred``: the same step with W and b detached (the same arithmetic,
    # so training and no-grad passes agree to the bit). The sequence path then
    # computes W's and b's gradients in one GEMM over all steps. A cell that uses
    # the product ``linear(state[0], W, b)`` any other way (still W, b nowhere
    # else, and still its output the new ``state[0]``) sets ``batched_grad_slot``;
    # its ``recur_deferred(xp_t, state, slot_t)`` adds ``slot_t`` to the detached
    # product (``batched_grad.add_slot``).
    def recurrent_weights(self) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """``(W, b)`` of the recurrent product, if this cell opts in to the batched weight gradient."""
        return None

    def recur_deferred(self, xp_t: Tensor, state: State, slot_t: Optional[Tensor] = None) -> tuple[Tensor, State]:
        """``recur`` with the recurrent weight and bias detached (their gradients are computed after the loop).

        ``slot_t`` is passed to a ``batched_grad_slot`` cell only, to add to its detached product.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement recur_deferred()")

    # Optional, for speed: a cell (or a wrapper) with a hand-written kernel for a whole training sequence. Where
    # the compiled path is installed (``sequence_runner``, rnnsearch.compile), ``forward_sequence`` runs
    # ``kernel_sequence`` when ``kernel_applies`` says so, and the step loop where it returns None.
    def kernel_applies(self, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
        """Whether grad-enabled training sequences of ``steps`` steps (``dtype``, autocast ``amp``) would run a kernel."""
        return False

    def kernel_sequence(self, x: Tensor, state: State, lengths: Optional[Tensor]) -> Optional[tuple[Tensor, State]]:
        """``forward_sequence``'s result through a hand-written kernel, or None where it does not run here.

        Called by ``forward_sequence`` after ``start_sequence``, where ``kernel_applies`` holds.
        """
        return None

    def batched_weights(self, steps: int) -> Optional[tuple[Tensor, Optional[Tensor]]]:
        """``(W, b)`` when a training sequence of ``steps`` steps takes the batched route now, else None."""
        # a subclass that redefines recur, or what recur_deferred relies on, gets the plain loop
        cls = type(self)
        owner = _owner(cls, "recur_deferred")
        if not self.batched_weight_grad or any(_owner(cls, m) is not owner
                                               for m in ("recur", *self.batched_grad_methods)):
            return None
        weights = self.recurrent_weights()
        if weights is None or not wants_batched_grad(weights[0], weights[1], steps):
            return None
        return weights

    def forward_sequence(
        self, x: Tensor, state: Optional[State] = None, lengths: Optional[Tensor] = None
    ) -> tuple[Tensor, State]:
        """Run over ``x`` ``[batch, time, input_size]``; return ``(outputs [batch, time, output_size], final_state)``.

        With ``lengths`` (``[batch]`` int64), steps at or past a sequence's
        length leave its state unchanged and output zeros.
        """
        batch, steps = x.shape[0], x.shape[1]
        if state is None:
            state = self.zero_state(batch, dtype=x.dtype, device=x.device)
        self.start_sequence(batch, x.device, x.dtype)
        if steps == 0:
            return x.new_zeros(batch, 0, self.output_size), state
        runner = self.__dict__.get("sequence_runner")  # a compiled loop (rnnsearch.compile), if installed
        if runner is not None and not runner.failed and torch.is_grad_enabled():
            dev = x.device.type
            amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            if self.kernel_applies(dev, x.dtype, amp, steps):  # a hand-written kernel instead of the loop
                result = self.kernel_sequence(x, state, lengths)
                if result is not None:
                    runner.kernel_calls += 1
                    return result
        batched = self.batched_weights(steps)
        holder = slot = None
        if batched is not None:
            holder = Holder()
            # the product's gradient arrives at a zero slot, not at xp (fixed by the class's recur_deferred)
            if getattr(_owner(type(self), "recur_deferred"), "batched_grad_slot", False):
                slot = BatchedRecurrentGrad.apply(zero_slot(x, batched[0].shape[0]), batched[0], batched[1], holder)
        # a compiled loop may project each chunk's inputs itself, fused with the steps' arithmetic
        project = runner is not None and self.compile_projection and (batched is None or slot is not None)
        xp = x if project else self.project_input(x)  # (b, t, projected), or raw when projecting in the loop
        if batched is not None and slot is None:  # the product's gradient is the projected inputs' one
            xp = BatchedRecurrentGrad.apply(xp, batched[0], batched[1], holder)
        mask_device = next(self.parameters(), x).device if project else xp.device
        valid = None if lengths is None else step_masks(lengths, steps, mask_device)  # (t, b, 1)
        outputs, final = (runner or run_steps)(self, xp, state, valid, deferred=holder is not None, project=project,
                                               slot=slot)
        if holder is not None:
            holder.set_previous(state[0], outputs)
            outputs, *rest = FirstOrderOnly.apply(outputs, *final)  # a gradient penalty raises, never misleads
            final = tuple(rest)
        return outputs, final

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.options if hasattr(self, k))
        return f"{self.input_size}, {self.hidden_size}" + (f", {opts}" if opts else "")


def step_masks(lengths: Tensor, steps: int, device: torch.device) -> Tensor:
    """``[time, batch, 1]`` bool: which rows are still inside their sequence at each step (built once per sequence)."""
    t = torch.arange(steps, device=device).unsqueeze(1)  # (t, 1)
    return (t < lengths.to(device).unsqueeze(0)).unsqueeze(2)  # (t, b, 1)


def _owner(cls: type, name: str) -> Optional[type]:
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def _check_step_override(cls: type) -> None:
    """Refuse a subclass whose own ``forward`` no sequence run would call.

    Sequences (``forward_sequence``, layers, models, the compiled loop) run ``project_input`` + ``recur``;
    ``RNNCell.recur`` calls ``forward``, so a cell that defines ``forward`` alone works. A subclass that
    defines ``forward`` but inherits a ``recur`` written for another ``forward`` (a registry cell's, a
    wrapper's) would have it called by hand only, and silently skipped everywhere else.
    """
    if "forward" not in vars(cls):
        return
    recur_owner = _owner(cls, "recur")
    if recur_owner in (None, cls, RNNCell):
        return
    raise TypeError(
        f"{cls.__qualname__} overrides forward() but inherits recur() from {recur_owner.__qualname__}: "
        f"sequence runs (forward_sequence, layers, build_model, the compiled loop) call project_input() + "
        f"recur(), never forward(), so this forward() would be skipped with no error everywhere but a "
        f"by-hand step. Override project_input() (the input's part, e.g. `return super().project_input(2 * x)`) "
        f"and/or recur() (the step given the projected input) instead; only a cell derived from RNNCell "
        f"directly may define its step by forward() alone.")


def check_step_result(cell: RNNCell, out: Tensor, new_state: State) -> None:
    """Raise if a step's output or state does not have the widths the cell declares.

    The loop pairs the new state with the old one tensor by tensor, so a cell that returns more state tensors
    than its ``state_size`` lists would lose the extra ones (only where sequences have lengths) with no error.
    """
    got = tuple(int(s.shape[-1]) for s in new_state) if isinstance(new_state, tuple) else None
    if got != tuple(cell.state_size) or out.shape[-1] != cell.output_size:
        raise ValueError(
            f"{type(cell).__name__} declares state_size {tuple(cell.state_size)} and output_size {cell.output_size}, "
            f"but its step returned a state of widths {got if got is not None else type(new_state).__name__} and "
            f"an output of width {out.shape[-1]}. Make state_size (one width per state tensor, in order) and "
            f"output_size (properties of the cell) match what the step returns; the state must be a tuple.")


def run_steps(cell: RNNCell, xp: Tensor, state: State, valid: Optional[Tensor] = None,
              deferred: bool = False, project: bool = False, slot: Optional[Tensor] = None) -> tuple[Tensor, State]:
    """The time loop: ``cell.recur`` over projected inputs ``xp`` ``[batch, time, projected]``.

    ``valid`` (``[time, batch, 1]`` bool, from :func:`step_masks`) masks padding
    the ``tf.nn.dynamic_rnn`` way: outputs past a sequence's length are zero and
    its state is carried through unchanged. Returns ``(outputs [batch, time, output_size], final_state)``.
    ``deferred`` runs ``cell.recur_deferred`` (:mod:`rnnsearch.cells.batched_grad`) instead of ``recur``;
    ``project``: ``xp`` holds the raw inputs ``[batch, time, input_size]``, projected here first;
    ``slot`` ``[batch, time, rows]``: the batched route's zero slot, passed to ``recur_deferred`` step by step.
    This plain function is also what :mod:`rnnsearch.compile` compiles, a chunk of steps at a time.
    """
    if project:
        xp = cell.project_input(xp)
    step = cell.recur_deferred if deferred else cell.recur
    slots = None if slot is None else slot.unbind(1)
    outputs = []
    for t, xp_t in enumerate(xp.unbind(1)):
        out, new_state = step(xp_t, state) if slots is None else step(xp_t, state, slots[t])
        if t == 0:
            check_step_result(cell, out, new_state)
        if valid is not None:
            v = valid[t]  # (b, 1)
            out = out.masked_fill(~v, 0.0)  # a select, not a product: NaN/inf padding stays out
            new_state = tuple(torch.where(v, n, s) for n, s in zip(new_state, state))
        outputs.append(out)
        state = new_state
    return torch.stack(outputs, 1), state
