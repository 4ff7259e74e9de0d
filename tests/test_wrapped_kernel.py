"""Wrapped cells run their cell's fused kernel where the wrapper acts outside the recurrence (correctness only).

``residual``, ``device`` and ``dropout`` without state dropout act on a sequence's inputs and outputs only:
a whole training sequence then runs through the wrapped ``lstm``'s (or ``ln_lstm``'s) kernel, the wrapper
applied before and after. The result is the step loop's (the same masks, where masks are drawn per
sequence; the same distribution where they are drawn per step). Zoneout and state dropout around a bare ``lstm``
or ``ln_lstm`` run its kernel, which zones or drops the state itself (checked against the wrapper's arithmetic in
float64 with the kernel's draws). Zoneout or state dropout elsewhere, a wrapper subclass that changes a step, and a
cell without a kernel keep the step loop.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import torch

from conftest import TINY, assert_close, compose_config
from rnnsearch import build_model, create_wrapper, train
from rnnsearch import compile as compiling
from rnnsearch.callbacks import Callback
from rnnsearch.cells import create_cell, ln_lstm_kernel
from rnnsearch.cells.base import RNNCell
from rnnsearch.cells.wrappers import DropoutWrapper
from rnnsearch.compile import ChunkRunner

pytestmark = pytest.mark.usefixtures("kernel_threads")  # each test on one thread, two, and rows apart

B, T, H = 5, 23, 16
LENGTHS = torch.tensor([23, 4, 17, 1, 22])


@pytest.fixture(autouse=True)
def eager_compile(monkeypatch):
    """torch.compile returns the function itself: the generic 'compiled' path runs eagerly, fast."""
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)


def _wrapped(wrappers: list[dict[str, Any]], cell: str = "lstm", **options: Any) -> RNNCell:
    torch.manual_seed(0)
    wrapped = create_cell(cell, input_size=H, hidden_size=H, **options)
    for spec in wrappers:
        spec = dict(spec)
        wrapped = create_wrapper(spec.pop("name"), wrapped, **spec)
    return wrapped


def _run(cell: RNNCell, x: torch.Tensor, lengths: Optional[torch.Tensor], seed: int = 3):
    """Outputs, final state and the gradients of a loss on them (the RNG seeded alike for both routes)."""
    x = x.clone().requires_grad_()
    cell.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out, final = cell.forward_sequence(x, None, lengths)
    h, c = final[0], final[1]
    w = torch.linspace(-1, 1, out.numel()).view_as(out)
    loss = (out * w).sum() + (h * h).sum() + 0.3 * c.sum()
    if len(final) == 3:  # FGR's gate state
        loss = loss + (final[2] * torch.linspace(-1, 1, final[2].numel()).view_as(final[2])).sum()
    loss.backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in cell.named_parameters()}}
    if len(final) == 3:
        grads["final gate state (the value)"] = final[2].detach()  # checked with the gradients
    return out.detach(), h.detach(), c.detach(), grads


def _both(wrappers: list[dict[str, Any]], lengths: Optional[torch.Tensor], cell: str = "lstm", **options: Any):
    """(step loop, kernel route, the kernel route's runner) for the same weights, input and seed."""
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2))
    loop = _wrapped(wrappers, cell, **options)
    fused = copy.deepcopy(loop)
    fused.sequence_runner = ChunkRunner(4)
    return _run(loop, x, lengths), _run(fused, x, lengths), fused.sequence_runner


def _assert_same(a: tuple, b: tuple, tol: float = 2e-5) -> None:
    for i, what in enumerate(("outputs", "final h", "final c")):
        assert_close(b[i], a[i], tol, what)
    for name, grad in a[3].items():
        scale = max(1.0, grad.abs().max().item())
        assert_close(b[3][name] / scale, grad / scale, tol, f"grad {name}")


@pytest.mark.parametrize("wrappers,lengths", [
    ([{"name": "residual"}], LENGTHS),
    ([{"name": "device", "device": "cpu"}], None),
    ([{"name": "dropout", "input_keep_prob": 0.7, "output_keep_prob": 0.6, "variational_recurrent": True}], LENGTHS),
    ([{"name": "residual"}, {"name": "dropout", "input_keep_prob": 0.8, "output_keep_prob": 0.5,
                             "variational_recurrent": True}, {"name": "device", "device": "cpu"}], LENGTHS),
], ids=["residual", "device", "variational-dropout", "residual-dropout-device"])
def test_a_wrapped_cell_runs_the_kernel_and_matches_the_step_loop(wrappers, lengths):
    """Per-sequence masks are drawn in start_sequence by both routes, so the results agree to float32 rounding."""
    loop, fused, runner = _both(wrappers, lengths, use_peepholes=True)
    assert runner.kernel_calls == 1 and runner.compiled_calls == 0, "the kernel ran, not the loop"
    _assert_same(loop, fused)
    if lengths is not None:
        assert (fused[0][1, 4:] == 0).all(), "steps past a sequence's length output zeros, the residual included"
    if any(w["name"] == "dropout" for w in wrappers):
        assert (fused[0][lengths > 1][:, :1] == 0).any(), "the masks dropped something"


def test_ln_lstm_under_dropout_runs_its_kernel():
    loop, fused, runner = _both([{"name": "dropout", "output_keep_prob": 0.6, "variational_recurrent": True}],
                                LENGTHS, cell="ln_lstm")
    assert runner.kernel_calls == 1
    _assert_same(loop, fused)


def test_per_step_dropout_on_the_kernel_route_drops_each_step_and_unit_independently():
    """Per-step masks: the kernel route draws them for the whole sequence at once, with the loop's distribution."""
    keep, batch, steps = 0.6, 64, 50
    torch.manual_seed(0)
    bare = create_cell("lstm", input_size=H, hidden_size=H)
    wrapped = create_wrapper("dropout", copy.deepcopy(bare), output_keep_prob=keep)
    wrapped.sequence_runner = ChunkRunner(4)
    x = torch.randn(batch, steps, H)
    out = wrapped.forward_sequence(x)[0]
    assert wrapped.sequence_runner.kernel_calls == 1
    undropped = bare.forward_sequence(x)[0].detach()
    kept = out.detach() != 0
    assert_close(out.detach()[kept], undropped[kept] / keep, 1e-5, "kept units scaled by 1/keep")
    rate = kept.float().mean().item()
    assert abs(rate - keep) < 0.02, f"kept {rate:.3f} of the units, expected {keep}"  # n=51,200: 5 sigma ~0.011
    assert not torch.equal(kept[:, 0], kept[:, 1]), "a new mask every step, as the loop draws"


class DoubledDropout(DropoutWrapper):
    def recur(self, xp_t, state):  # noqa: ANN001 - a user's change to the step
        out, new_state = super().recur(xp_t, state)
        return 2 * out, new_state


@pytest.mark.parametrize("case", ["zoneout-around-residual", "state-dropout-around-residual", "subclass", "gru"])
def test_wrappers_that_act_inside_the_recurrence_keep_the_step_loop(case):
    wrappers = {"zoneout-around-residual": [{"name": "residual"}, {"name": "zoneout"}],
                "state-dropout-around-residual": [{"name": "residual"}, {"name": "dropout", "state_keep_prob": 0.8}],
                "subclass": [], "gru": [{"name": "dropout", "output_keep_prob": 0.8}]}[case]
    cell = _wrapped(wrappers, {"gru": "gru", "subclass": "lstm"}.get(case, "ln_lstm"))
    if case == "subclass":
        cell = DoubledDropout(cell)
    cell.sequence_runner = ChunkRunner(4)
    assert not cell.kernel_applies("cpu", torch.float32, None, T)
    loop = copy.deepcopy(cell)
    del loop.sequence_runner
    x = torch.randn(B, T, H)
    torch.manual_seed(1)
    out = cell.forward_sequence(x)[0]
    torch.manual_seed(1)
    expected = loop.forward_sequence(x)[0]
    assert cell.sequence_runner.kernel_calls == 0 and cell.sequence_runner.compiled_calls > 0
    assert_close(out, expected, 1e-6, "the compiled step loop's result")


def test_no_grad_runs_the_step_loop_and_dropout_is_the_identity_at_eval():
    cell = _wrapped([{"name": "dropout", "output_keep_prob": 0.5}])
    bare = copy.deepcopy(cell.cell)
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, H)
    with torch.no_grad():
        cell.forward_sequence(x)
    assert cell.sequence_runner.kernel_calls == 0, "the kernel trains; a no-grad pass runs the loop"
    cell.eval()
    out = cell.forward_sequence(x)[0]
    assert cell.sequence_runner.kernel_calls == 1, "eval with grad: the kernel, with the wrapper the identity"
    assert_close(out.detach(), bare.forward_sequence(x)[0].detach(), 1e-5, "no dropout at eval")


def test_a_dropout_stack_runs_every_layer_through_the_kernel_and_prepare_counts_them():
    torch.manual_seed(0)
    model = {"hidden_size": H, "num_layers": 2, "bidirectional": True, "fused": "never",
             "wrappers": [{"name": "dropout", "input_keep_prob": 0.9, "output_keep_prob": 0.8}]}
    cells = build_model({"cell": {"name": "lstm"}, "model": model}, H, 3)
    decision = compiling.prepare(cells, "true", optimizer_steps=10, seq_len=T, batch_size=B, masked=True,
                                 device="cpu")
    assert "4 cell(s) run a fused CPU kernel" in decision.reason
    out = cells(torch.randn(B, T, H), LENGTHS)
    out.sum().backward()
    assert [c.sequence_runner.kernel_calls for c in compiling.step_cells(cells)] == [1, 1, 1, 1]


def test_training_a_peephole_lstm_under_variational_dropout_with_compile_true_runs_the_kernel():
    class Seen(Callback):
        def on_train_begin(self, info: dict[str, Any]) -> None:
            self.info = info

    seen = Seen()
    result = train(compose_config([*TINY, "cell=lstm", "cell.use_peepholes=true", "model.compile=true",
                                   "model.wrappers=[{name: dropout, variational_recurrent: true, "
                                   "output_keep_prob: 0.8}]", "task.train_size=96", "train.batch_size=32",
                                   "train.epochs=2", "task.seq_len=12"]), callbacks=[seen])
    runner = compiling.step_cells(seen.info["model"])[0].sequence_runner
    assert runner.kernel_calls == 6 and runner.compiled_calls == 0  # 3 batches x 2 epochs; nothing for inductor
    assert result["test/mse"] == result["test/mse"]  # finite, not NaN


def _float64_reference(cell: RNNCell, x: torch.Tensor, lengths: Optional[torch.Tensor], wrap):
    """A wrapper's arithmetic, step by step in float64: ``wrap(t, h, c, out, h_new, c_new)`` gives the state passed
    on and the output, ``(h', c', out')``; padding as the step loop does it. Outputs, final state, gradients."""
    x = x.double().clone().requires_grad_()
    cell.zero_grad(set_to_none=True)
    h, c = cell.zero_state(x.shape[0], dtype=torch.float64)
    xp, outs = cell.project_input(x), []
    for t in range(x.shape[1]):
        out, (h_new, c_new) = cell.recur(xp[:, t], (h, c))
        h_new, c_new, out = wrap(t, h, c, out, h_new, c_new)
        if lengths is not None:
            v = (t < lengths).unsqueeze(1)
            h_new, c_new, out = torch.where(v, h_new, h), torch.where(v, c_new, c), out.masked_fill(~v, 0.0)
        outs.append(out)
        h, c = h_new, c_new
    out = torch.stack(outs, 1)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * w).sum() + (h * h).sum() + 0.3 * c.sum()).backward()
    return out.detach(), h.detach(), c.detach(), {"x": x.grad, **{f"cell.{n}": p.grad for n, p in cell.named_parameters()}}


def _zoned_reference(cell: RNNCell, x: torch.Tensor, lengths: Optional[torch.Tensor], zh: torch.Tensor,
                     zc: torch.Tensor):
    """The zoneout wrapper's arithmetic in float64, with given draws (1: keep the previous value); outputs the zoned h."""
    def zone(t, h, c, out, h_new, c_new):  # noqa: ANN001, ANN202
        h_new = h_new + zh[t].double() * (h - h_new)
        return h_new, c_new + zc[t].double() * (c - c_new), h_new

    return _float64_reference(cell, x, lengths, zone)


@pytest.mark.parametrize("name,options,lengths", [
    ("lstm", {}, None), ("lstm", {"use_peepholes": True, "cell_clip": 0.5}, LENGTHS),
    ("lstm", {"variant": "CIFG", "use_peepholes": True}, LENGTHS), ("lstm", {"input_size": 7}, LENGTHS),
    ("ln_lstm", {}, None), ("ln_lstm", {"forget_bias": 0.3, "eps": 1e-3}, LENGTHS),
    ("ln_lstm", {"input_size": 7}, LENGTHS),
], ids=["plain", "peepholes-clip-lengths", "CIFG", "input-7-lengths", "ln_lstm", "ln_lstm-options-lengths",
        "ln_lstm-input-7-lengths"])
def test_zoneout_around_a_cell_runs_its_kernel_with_the_wrappers_arithmetic(name, options, lengths, monkeypatch):
    """Training: the kernel's own draws (recorded) give what the wrapper's step computes with them, in float64."""
    torch.manual_seed(0)
    options = dict(options)
    inputs = options.pop("input_size", H)  # lstm's kernel rows are [x_t, h_{t-1}]: a width other than H too
    cell = create_wrapper("zoneout", create_cell(name, input_size=inputs, hidden_size=H, **options), h_prob=0.3,
                          c_prob=0.6)
    with torch.no_grad():
        cell.cell.weight_ih.mul_(4.0)  # large enough for the clip to bite
    reference = copy.deepcopy(cell.cell).double()
    cell.sequence_runner = ChunkRunner(4)
    draws, draw = [], ln_lstm_kernel.zoneout_draws
    monkeypatch.setattr(ln_lstm_kernel, "zoneout_draws", lambda *a: draws.append(draw(*a)) or draws[-1])
    x = torch.randn(B, T, inputs, generator=torch.Generator().manual_seed(2))
    fused = _run(cell, x, lengths)
    assert cell.sequence_runner.kernel_calls == 1 and cell.sequence_runner.compiled_calls == 0
    ((zh, zc),) = draws
    assert zh.shape == zc.shape == (T, B, H), "one draw per unit and step, for h and for c"
    assert abs(zh.mean().item() - 0.3) < 0.05 and abs(zc.mean().item() - 0.6) < 0.05
    exact = _zoned_reference(reference, x, lengths, zh, zc)
    _assert_same(exact, fused, 5e-5)
    out = fused[0]  # (B, T, H); a unit that keeps its h outputs the previous step's value exactly, as torch.lerp's
    steps = torch.arange(T)
    valid = steps.unsqueeze(0) < (lengths if lengths is not None else torch.full((B,), T)).unsqueeze(1)  # (B, T)
    kept = zh.permute(1, 0, 2)[:, 1:].bool() & valid[:, 1:, None]
    assert kept.any() and torch.equal(out[:, 1:][kept], out[:, :-1][kept])


@pytest.mark.parametrize("name,options", [("lstm", {"use_peepholes": True}), ("ln_lstm", {})], ids=["lstm", "ln_lstm"])
def test_zoneout_at_eval_with_grad_matches_the_step_loop(name, options):
    """Eval: the expectation (no draws), the same on both routes."""
    cell = _wrapped([{"name": "zoneout", "h_prob": 0.2, "c_prob": 0.7}], name, **options).eval()
    twin = copy.deepcopy(cell)
    twin.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, H)
    _assert_same(_run(cell, x, LENGTHS), _run(twin, x, LENGTHS))
    assert twin.sequence_runner.kernel_calls == 1


@pytest.mark.parametrize("wrappers,cell,kernel", [
    ([{"name": "zoneout"}, {"name": "dropout", "output_keep_prob": 0.8}], "lstm", True),  # dropout outside zoneout
    ([{"name": "dropout", "output_keep_prob": 0.8}, {"name": "zoneout"}], "lstm", False),  # zoneout outside dropout
    ([{"name": "zoneout"}], "ln_lstm", True),
    ([{"name": "dropout", "output_keep_prob": 0.8}, {"name": "zoneout"}], "ln_lstm", False),
    ([{"name": "zoneout"}], "gru", False),
], ids=["dropout-around-zoneout", "zoneout-around-dropout", "ln_lstm", "ln_lstm-zoneout-around-dropout", "gru"])
def test_which_zoneout_stacks_run_the_kernel(wrappers, cell, kernel):
    wrapped = _wrapped(wrappers, cell)
    assert wrapped.kernel_applies("cpu", torch.float32, None, T) is kernel
    fgr = _wrapped([{"name": "zoneout"}], variant="FGR")
    assert not fgr.kernel_applies("cpu", torch.float32, None, T), "FGR's third state is zoned too: the step loop"


def test_zoneout_in_eval_under_a_float64_default_dtype_still_runs_the_float32_kernel():
    cell = _wrapped([{"name": "zoneout"}]).eval()
    cell.sequence_runner = ChunkRunner(4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = cell.forward_sequence(torch.randn(B, T, H, dtype=torch.float32))[0]
    finally:
        torch.set_default_dtype(default)
    assert cell.sequence_runner.kernel_calls == 1 and out.dtype == torch.float32


def test_zoneouts_draws_are_reproducible_independent_and_at_their_rate():
    """torch.manual_seed reproduces them; h's and c's, steps and units are independent; each at its probability."""
    shape = (50, 64, 37)
    torch.manual_seed(5)
    zh, zc = ln_lstm_kernel.zoneout_draws(shape, 0.05, 0.5)
    torch.manual_seed(5)
    again = ln_lstm_kernel.zoneout_draws(shape, 0.05, 0.5)
    assert torch.equal(zh, again[0]) and torch.equal(zc, again[1])
    assert not torch.equal(ln_lstm_kernel.zoneout_draws(shape, 0.05, 0.5)[1], zc), "a new seed, new draws"
    n = zh.numel()  # 118,400: the rates within 5 standard deviations
    assert abs(zh.mean().item() - 0.05) < 5 * (0.05 * 0.95 / n) ** 0.5
    assert abs(zc.mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5
    assert set(zh.unique().tolist()) == {0.0, 1.0}
    both = (zh * zc).mean().item()  # independent: P(both) = 0.025
    assert abs(both - 0.025) < 5 * (0.025 * 0.975 / n) ** 0.5
    lag = (zc[1:] * zc[:-1]).mean().item()  # step t and t+1 independent: 0.25
    assert abs(lag - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5
    never, always = ln_lstm_kernel.zoneout_draws(shape, 0.0, 1.0)
    assert never.sum() == 0 and always.all()


@pytest.mark.parametrize("name,options", [("lstm", {"use_peepholes": True}), ("lstm", {"variant": "FGR"}),
                                          ("ln_lstm", {})], ids=["peepholes", "FGR", "ln_lstm"])
def test_variational_state_dropout_around_a_cell_runs_its_kernel_and_matches_the_step_loop(name, options):
    """The state's mask is drawn in start_sequence by both routes: the same results to float32 rounding."""
    wrappers = [{"name": "dropout", "state_keep_prob": 0.6, "output_keep_prob": 0.8, "input_keep_prob": 0.9,
                 "variational_recurrent": True}]
    loop, fused, runner = _both(wrappers, LENGTHS, name, **options)
    assert runner.kernel_calls == 1 and runner.compiled_calls == 0
    _assert_same(loop, fused)
    assert (fused[1] == 0).any(), "the final state is the dropped h"


def _state_dropped_reference(cell: RNNCell, x: torch.Tensor, lengths: Optional[torch.Tensor], mult: torch.Tensor):
    """TF's state dropout in float64: the h passed on is h * mult[t]; the output is h."""
    return _float64_reference(cell, x, lengths, lambda t, h, c, out, h_new, c_new: (h_new * mult[t].double(), c_new, out))


@pytest.mark.parametrize("name,options", [("lstm", {"use_peepholes": True}), ("ln_lstm", {"forget_bias": 0.3})],
                         ids=["lstm", "ln_lstm"])
def test_per_step_state_dropout_around_a_cell_runs_its_kernel_with_the_wrappers_arithmetic(name, options, monkeypatch):
    """Training with a fresh state mask each step: the kernel's own multipliers (recorded) in a float64 step loop."""
    torch.manual_seed(0)
    cell = create_wrapper("dropout", create_cell(name, input_size=H, hidden_size=H, **options), state_keep_prob=0.7)
    reference = copy.deepcopy(cell.cell).double()
    cell.sequence_runner = ChunkRunner(4)
    seen, multipliers = [], DropoutWrapper._state_multipliers
    monkeypatch.setattr(DropoutWrapper, "_state_multipliers", lambda self, *a: seen.append(multipliers(self, *a))
                        or seen[-1])
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2))
    fused = _run(cell, x, LENGTHS)
    assert cell.sequence_runner.kernel_calls == 1
    (mult,) = seen
    assert mult.shape == (T, B, H) and mult.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert abs((mult > 0).float().mean().item() - 0.7) < 0.05 and not torch.equal(mult[0], mult[1])
    _assert_same(_state_dropped_reference(reference, x, LENGTHS, mult), fused, 5e-5)
