"""The batched recurrent weight gradient (rnnsearch.cells.batched_grad) changes speed, never results.

A training sequence of an ``lstm`` (any variant, peepholes, projection, clips),
``rnn`` or ``ln_lstm`` cell computes ``weight_hh``'s (and ``bias_hh``'s, which ``ln_lstm`` lacks)
gradients in one GEMM after the loop. Each case here compares outputs and every gradient with
the same cell stepped one ``cell(x_t, state)`` call at a time (autograd through
``linear`` every step), in float64, with and without per-sequence lengths.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import Tensor

from conftest import assert_close
from rnnsearch import create_cell
from rnnsearch.cells.base import step_masks
from rnnsearch.cells.lstm import LSTMCell
from rnnsearch.cells.lstm_variants import VARIANTS

B, T, I, H = 4, 7, 3, 5
LENGTHS = torch.tensor([7, 2, 5, 1])


def _stepwise(cell, x: Tensor, lengths: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The reference: one ``cell(x_t, state)`` call per step, masked the dynamic_rnn way."""
    state = cell.zero_state(x.shape[0], dtype=x.dtype)
    state = tuple(s + 0.1 for s in state)  # a non-zero initial state: h_0 enters dW
    valid = None if lengths is None else step_masks(lengths, x.shape[1], x.device)
    outs = []
    for t in range(x.shape[1]):
        out, new = cell(x[:, t], state)
        if valid is not None:
            out = out.masked_fill(~valid[t], 0.0)
            new = tuple(torch.where(valid[t], n, s) for n, s in zip(new, state))
        outs.append(out)
        state = new
    return torch.stack(outs, 1), state


def _sequence(cell, x: Tensor, lengths: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    state = tuple(s + 0.1 for s in cell.zero_state(x.shape[0], dtype=x.dtype))
    return cell.forward_sequence(x, state, lengths)


def _grads(cell, run, x: Tensor, lengths: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    x = x.clone().requires_grad_()
    cell.zero_grad(set_to_none=True)
    out, state = run(cell, x, lengths)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + sum((s * (k + 1)).sum() for k, s in enumerate(state))  # final state gets gradient too
    loss.backward()
    return out.detach(), {n: p.grad for n, p in cell.named_parameters()}, x.grad


def _uses_batched_grad(out: Tensor) -> bool:
    """Whether the autograd graph behind ``out`` has the batched weight-gradient node."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "BatchedRecurrentGradBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


CELLS: list[tuple[str, dict[str, Any]]] = [
    ("lstm", {}),
    ("lstm", {"forget_bias": 0.0, "use_peepholes": True, "cell_clip": 0.5}),
    ("lstm", {"num_proj": 3, "proj_clip": 0.4, "use_peepholes": True}),
    *[("lstm", {"variant": v, "use_peepholes": v != "NP"}) for v in VARIANTS if v != "vanilla"],
    ("rnn", {}),
    ("rnn", {"activation": "relu"}),
    ("ln_lstm", {}),  # the slot route: the product is layer-normalised before it meets xp_t
    ("ln_lstm", {"forget_bias": 0.0, "eps": 1e-3}),
]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("name,options", CELLS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                                                     for n, o in CELLS])
def test_batched_weight_gradient_equals_the_stepwise_one(name, options, with_lengths):
    cell = create_cell(name, I, H, **options).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    lengths = LENGTHS if with_lengths else None
    out_s, g_s, gx_s = _grads(cell, _stepwise, x, lengths)
    out_b, g_b, gx_b = _grads(cell, _sequence, x, lengths)
    assert_close(out_b, out_s, what="outputs")
    assert_close(gx_b, gx_s, what="input gradient")
    assert g_b.keys() == g_s.keys()
    for k in g_s:
        assert_close(g_b[k], g_s[k], what=f"grad {k}")
    assert _uses_batched_grad(_sequence(cell, x, lengths)[0])


def test_the_batched_route_is_taken_only_when_it_is_needed():
    cell = create_cell("lstm", I, H)
    x = torch.randn(B, T, I)
    assert _uses_batched_grad(cell.forward_sequence(x)[0])
    assert not _uses_batched_grad(cell.forward_sequence(x[:, :1])[0]), "one step: nothing to batch"
    with torch.no_grad():
        out, _ = cell.forward_sequence(x)
    assert out.grad_fn is None
    cell.weight_hh.requires_grad_(False)
    cell.bias_hh.requires_grad_(False)
    assert not _uses_batched_grad(cell.forward_sequence(x)[0]), "frozen recurrent weights"
    assert not _uses_batched_grad(create_cell("gru", I, H).forward_sequence(x)[0]), "gru does not opt in"
    plain = create_cell("lstm", I, H)
    plain.batched_weight_grad = False
    assert not _uses_batched_grad(plain.forward_sequence(x)[0]), "switched off on the cell"


def test_training_and_no_grad_sequences_agree_to_the_bit():
    cell = create_cell("lstm", I, H, use_peepholes=True)
    x = torch.randn(B, T, I)
    out, (h, c) = cell.forward_sequence(x, lengths=LENGTHS)
    with torch.no_grad():
        ref, (rh, rc) = cell.forward_sequence(x, lengths=LENGTHS)
    assert torch.equal(out, ref) and torch.equal(h, rh) and torch.equal(c, rc)


class _Leaky(LSTMCell):
    """A user cell that changes ``recur`` (and inherits ``recur_deferred``): it must not take the batched route."""

    def recur(self, xp_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        out, (h, c) = super().recur(xp_t, state)
        h = 0.5 * h + 0.5 * state[0] @ self.weight_hh[: self.hidden_size].T
        return h, (h, c)


def test_a_subclass_that_redefines_recur_gets_the_plain_loop():
    cell = _Leaky(I, H).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    out_s, g_s, _ = _grads(cell, _stepwise, x, None)
    out_b, g_b, _ = _grads(cell, _sequence, x, None)
    assert not _uses_batched_grad(_sequence(cell, x, None)[0])
    assert_close(out_b, out_s, what="outputs")
    for k in g_s:
        assert_close(g_b[k], g_s[k], what=f"grad {k}")


class _Doubled(LSTMCell):
    """A user cell that changes the shared ``_step`` (so its output is no longer its state): plain loop."""

    def _step(self, xp_t, state, weight_hh, bias_hh):
        out, new = super()._step(xp_t, state, weight_hh, bias_hh)
        return 2 * out, new


def test_a_subclass_that_redefines_what_recur_deferred_uses_gets_the_plain_loop():
    cell = _Doubled(I, H).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    assert not _uses_batched_grad(_sequence(cell, x, None)[0])
    _, g_s, _ = _grads(cell, _stepwise, x, LENGTHS)
    _, g_b, _ = _grads(cell, _sequence, x, LENGTHS)
    for k in g_s:
        assert_close(g_b[k], g_s[k], what=f"grad {k}")


@pytest.mark.parametrize("name", ["lstm", "ln_lstm"])
def test_a_broadcast_initial_state_works(name):
    cell = create_cell(name, I, H).double()
    h0 = torch.randn(1, H, dtype=torch.float64, requires_grad=True)  # e.g. a learned initial state
    c0 = torch.zeros(1, H, dtype=torch.float64)
    x = torch.randn(B, T, I, dtype=torch.float64)
    grads = []
    for batched in (True, False):
        cell.batched_weight_grad = batched
        cell.zero_grad(set_to_none=True)
        h0.grad = None
        out, _ = cell.forward_sequence(x, (h0, c0))
        assert _uses_batched_grad(out) == batched
        out.pow(2).sum().backward()
        bias = cell.bias_hh if name == "lstm" else cell.bias  # ln_lstm has one bias, on the input side
        grads.append((cell.weight_hh.grad.clone(), bias.grad.clone(), h0.grad.clone()))
    for a, b, what in zip(*grads, ("weight_hh", "bias", "h0")):
        assert_close(a, b, what=f"grad {what}")


@pytest.mark.parametrize("what", ["outputs", "initial state"])
def test_changing_what_the_weight_gradient_needs_in_place_is_a_clear_error(what):
    cell = create_cell("lstm", I, H)
    h0, c0 = torch.randn(B, H), torch.zeros(B, H)
    out, _ = cell.forward_sequence(torch.randn(B, T, I), (h0, c0))
    loss = out.sum()
    with torch.no_grad():
        (out if what == "outputs" else h0).add_(1.0)  # the h_{t-1} of dW = dXP^T H_prev: now wrong
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


@pytest.mark.parametrize("wrt", ["inputs", "initial state"])
@pytest.mark.parametrize("name", ["lstm", "ln_lstm"])
def test_double_backward_needs_the_switch_off(name, wrt):
    """A gradient penalty differentiates the gradient: the batched route refuses, the plain one gives it.

    The steps' ``dh = dpre W`` use a detached ``W``, so a penalty on any gradient through the loop (the
    inputs', or the initial state's, which never meets ``xp`` or the slot) would miss W's terms if it ran.
    """
    cell = create_cell(name, I, H).double()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)

    def penalty():
        out = cell.forward_sequence(x, (h0, torch.zeros_like(h0)))[0]
        (g,) = torch.autograd.grad(out.pow(2).sum(), x if wrt == "inputs" else h0, create_graph=True)
        return g.pow(2).sum()

    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        penalty().backward()
    cell.batched_weight_grad = False
    cell.zero_grad(set_to_none=True)
    penalty().backward()
    assert torch.isfinite(cell.weight_hh.grad).all() and cell.weight_hh.grad.abs().sum() > 0


def test_the_slot_route_is_the_class_contract_not_an_instance_switch():
    """Setting ``batched_grad_slot`` off on an ln_lstm (instance or subclass) must not send it down the xp route."""
    from rnnsearch.cells.ln_lstm import LayerNormLSTMCell

    class NoSlot(LayerNormLSTMCell):
        batched_grad_slot = False  # a user's mistake: the class's recur_deferred still takes a slot

    x = torch.randn(B, T, I, dtype=torch.float64)
    for cell in (create_cell("ln_lstm", I, H).double(), NoSlot(I, H).double()):
        cell.batched_grad_slot = False
        _, g_s, _ = _grads(cell, _stepwise, x, LENGTHS)
        out_b, g_b, _ = _grads(cell, _sequence, x, LENGTHS)
        assert _uses_batched_grad(_sequence(cell, x, LENGTHS)[0])
        for k in g_s:
            assert_close(g_b[k], g_s[k], what=f"grad {k}")


@pytest.mark.parametrize("name,options", [("lstm", {"num_proj": 4}), ("ln_lstm", {})], ids=["lstm", "ln_lstm"])
def test_bf16_autocast_gives_float32_gradients_close_to_the_stepwise_ones(name, options):
    cell = create_cell(name, I, H, **options)
    x = torch.randn(B, T, I)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(cell, fn, x, LENGTHS)

    out_s, g_s, _ = run(_stepwise)
    out_b, g_b, _ = run(_sequence)
    assert out_b.dtype == out_s.dtype == (torch.bfloat16 if name == "lstm" else torch.float32)  # ln_lstm: LN in fp32
    for k in g_s:
        assert g_b[k].dtype == torch.float32, k
        scale = g_s[k].abs().max().item()
        assert_close(g_b[k], g_s[k], tol=0.05 * scale + 1e-3, what=f"bf16 grad {k}")
