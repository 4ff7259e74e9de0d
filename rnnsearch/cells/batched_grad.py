"""The recurrent weight's gradient as one GEMM over the whole sequence, not one per step.

One job. A cell whose step is ``pre_t = xp_t + linear(h_{t-1}, W, b)`` (LSTM and
its variants, the basic RNN) needs ``dW = Σ_t dpre_tᵀ h_{t-1}`` and
``db = Σ_t dpre_t``. Autograd through ``linear`` computes these step by step:
T small GEMMs whose inner dimension is the batch, the main reason a
cell-by-cell loop trails oneDNN's and cuDNN's fused LSTM (which do one). Since
``pre_t`` is ``xp_t`` plus terms that do not involve ``xp_t``,
``dpre_t = dxp_t``: the gradient that reaches the projected inputs is the one
``W`` needs. So the sequence path

1. passes the projected inputs through :class:`BatchedRecurrentGrad` (the
   identity forward),
2. runs the steps with ``W`` and ``b`` detached (``cell.recur_deferred``: the
   same arithmetic, so the same outputs to the bit), so no step computes a
   weight gradient (``dh_{t-1} = dpre_t W`` still flows),
3. records ``h_{t-1}`` for every step after the loop (the initial state and
   the outputs shifted by one, see :meth:`Holder.set_previous`),

and when the gradient of the projected inputs arrives (after every step's
backward) computes ``dW = dXPᵀ H_prev`` and ``db = Σ dXP`` in one call each.
Padding needs no care: a step past a sequence's length passes no gradient to
its pre-activations, so those rows of ``dXP`` are zero.

A cell whose product is not added straight to ``xp_t`` (``ln_lstm`` normalises
it first: ``gates = xp_t + LN(linear(h, W))``) sets ``batched_grad_slot``: the
sequence path then passes an all-zero *slot* ``[batch, time, rows]`` (a broadcast
scalar: no memory forward; its gradient, like ``dXP``, is dense) through
:class:`BatchedRecurrentGrad` instead of ``xp``, and the cell's
``recur_deferred(xp_t, state, slot_t)`` adds ``slot_t`` to its detached
product (:func:`add_slot`; adding zero changes no bit). The slot's gradient is
then exactly ``dR_t``, the gradient of the product, whatever the cell does
with it afterwards, and ``dW = dSlotᵀ H_prev`` as before.

Limits: the gradient is first-order only. The steps' ``dh_{t-1} = dpre_t W`` use
a detached ``W``, so a second derivative (a gradient penalty) would silently
miss ``W``'s terms: the sequence's outputs and final state pass through
:class:`FirstOrderOnly`, and differentiating any gradient that flowed through
them raises. The initial state and the outputs must not be changed in place
before backward (that raises too). ``cell.batched_weight_grad = False``
gives plain per-step autograd for either.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class Holder:
    """Carries ``h_{t-1}`` of every step from after the loop to the backward pass."""

    def __init__(self) -> None:
        self.initial: Optional[Tensor] = None
        self.outputs: Optional[Tensor] = None
        self.versions = (-1, -1)

    def set_previous(self, initial: Tensor, outputs: Tensor) -> None:
        """``initial`` ``[batch or 1, width]`` is ``h_0``; ``outputs`` ``[batch, time, width]`` are ``h_1 … h_T``."""
        self.initial = initial.detach()
        self.outputs = outputs.detach()
        self.versions = (initial._version, outputs._version)

    def previous(self) -> Tensor:
        """``[batch, time, width]``: ``h_{t-1}`` for every step ``t``."""
        if self.outputs is None or self.initial is None:
            raise RuntimeError("BatchedRecurrentGrad: backward ran before the sequence recorded its states.")
        if (self.initial._version, self.outputs._version) != self.versions:
            raise RuntimeError(
                "BatchedRecurrentGrad: a recurrent cell's initial state or its sequence outputs were modified in "
                "place between forward and backward; the recurrent weight gradient needs them unchanged. Use an "
                "out-of-place op, or set cell.batched_weight_grad = False for per-step autograd.")
        initial = self.initial.expand(self.outputs.shape[0], -1).to(self.outputs.dtype)  # a broadcast h_0 too
        return torch.cat([initial.unsqueeze(1), self.outputs[:, :-1]], 1)


class BatchedRecurrentGrad(torch.autograd.Function):
    """Identity forward; backward passes ``dxp`` through and computes ``dW``, ``db`` for the whole sequence."""

    @staticmethod
    def forward(ctx: Any, xp: Tensor, weight: Tensor, bias: Optional[Tensor], holder: Holder) -> Tensor:
        ctx.holder = holder
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return xp.view_as(xp)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        g = grad.reshape(-1, grad.shape[-1])  # (batch · time, rows)
        d_weight = d_bias = None
        if ctx.needs_input_grad[1]:
            h = ctx.holder.previous()
            d_weight = g.t().mm(h.reshape(-1, h.shape[-1]).to(g.dtype)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            d_bias = g.sum(0).to(ctx.bias_dtype)
        return grad, d_weight, d_bias, None


class FirstOrderOnly(torch.autograd.Function):
    """Identity on a sequence's outputs and final state whose backward refuses to be differentiated again."""

    @staticmethod
    def forward(ctx: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        return grads


def zero_slot(like: Tensor, rows: int) -> Tensor:
    """``[batch, time, rows]`` zeros for the slot route, of ``like``'s batch, time, dtype and device (no memory)."""
    return like.new_zeros(()).expand(like.shape[0], like.shape[1], rows)


def add_slot(product: Tensor, slot_t: Optional[Tensor]) -> Tensor:
    """``product + slot_t`` (the slot route's step), or ``product`` alone outside it."""
    return product if slot_t is None else product + slot_t.to(product.dtype)


def wants_batched_grad(weight: Tensor, bias: Optional[Tensor], steps: int) -> bool:
    """Whether the sequence path should take the batched route: grads are on and needed, and there is a loop."""
    needed = weight.requires_grad or (bias is not None and bias.requires_grad)
    return steps > 1 and needed and torch.is_grad_enabled()
