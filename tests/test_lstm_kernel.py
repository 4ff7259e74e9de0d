"""``lstm``'s fused CPU kernel computes what the cell computes (correctness only, no timing).

Against the generic cell-by-cell path in float64: outputs, final states and every gradient, with
peepholes, a cell clip that bites, forget biases, lengths, a given initial state, both directions. Where
the kernel must not run (projection, another activation, a subclass, float64, autocast,
no grad, the switch off), it does not. Greff et al.'s variants run their own instantiations, checked the
same way (FGR with its third state tensor, the previous gates, given and differentiated too). The kernel shares
its extension with ``ln_lstm``'s; the first test to load it builds it (about a minute) into the shared cache.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import pytest
import torch

from conftest import (TINY, UNEVEN_TILES, assert_as_close_as_float32, assert_close, check_uneven_tiles,
                      compose_config)
from rnnsearch import build_model, train
from rnnsearch import compile as compiling
from rnnsearch.callbacks import Callback
from rnnsearch.cells import ln_lstm_kernel, lstm_kernel
from rnnsearch.cells.lstm import LSTMCell
from rnnsearch.compile import ChunkRunner

pytestmark = pytest.mark.usefixtures("kernel_threads")  # each test on one thread, two, and rows apart

B, T, IN, H = 5, 23, 7, 24
LENGTHS = torch.tensor([23, 4, 17, 1, 22])  # unsorted, one of length 1


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile returns the function itself: the generic 'compiled' path runs eagerly, fast."""
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)


def _cell(hidden: int = H, inputs: int = IN, **options: Any) -> LSTMCell:
    torch.manual_seed(0)
    cell = LSTMCell(inputs, hidden, **options)
    with torch.no_grad():  # weights large enough for the cell state to reach a clip of 0.5
        cell.weight_ih.mul_(4.0)
        for name in ("weight_ci", "weight_cf", "weight_co"):
            if hasattr(cell, name):
                getattr(cell, name).uniform_(-0.8, 0.8)
    return cell


def _run(cell: LSTMCell, x: torch.Tensor, lengths: Optional[torch.Tensor], with_state: bool,
         input_grad: bool = True):
    """Outputs, final state and the gradients of a loss on them all, w.r.t. input (unless not ``input_grad``: the
    kernel then keeps only each step's rows of the gates' gradient), state and parameters."""
    x = x.to(cell.weight_hh.dtype).clone().requires_grad_(input_grad)
    cell.zero_grad(set_to_none=True)
    state = None
    if with_state:
        g = torch.Generator().manual_seed(1)
        state = tuple((0.5 * torch.randn(x.shape[0], n, generator=g)).to(x.dtype).requires_grad_()
                      for n in cell.state_size)
    out, final = cell.forward_sequence(x, state, lengths)
    h, c = final[0], final[1]
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + (h * h).sum() + 0.3 * c.sum()
    if len(final) == 3:  # FGR's gate state
        loss = loss + (final[2] * torch.linspace(-1, 1, final[2].numel(), dtype=out.dtype).view_as(final[2])).sum()
    loss.backward()
    grads = {**({"x": x.grad} if input_grad else {}), **{n: p.grad for n, p in cell.named_parameters()}}
    if with_state:
        grads.update({f"state{k}": s.grad for k, s in enumerate(state)})
    if len(final) == 3:
        grads["final gate state (the value)"] = final[2].detach()  # checked with the gradients
    return out.detach(), h.detach(), c.detach(), grads


@pytest.mark.parametrize("options,lengths,with_state", [
    ({}, None, False),
    ({"use_peepholes": True, "forget_bias": 0.3}, LENGTHS, True),
    ({"use_peepholes": True, "cell_clip": 0.5}, LENGTHS, False),
    ({"cell_clip": 0.5, "forget_bias": 0.0}, None, True),
    ({"hidden": 13, "use_peepholes": True}, LENGTHS, True),  # not a multiple of the vector width: the scalar tails
    # Greff et al.'s variants (all but FGR), with peepholes as in the paper
    ({"variant": "NIG", "use_peepholes": True}, LENGTHS, True),
    ({"variant": "NFG", "use_peepholes": True, "cell_clip": 0.5}, None, False),
    ({"variant": "NOG", "use_peepholes": True}, LENGTHS, False),
    ({"variant": "NIAF", "use_peepholes": True, "forget_bias": 0.3}, None, True),
    ({"variant": "NOAF", "use_peepholes": True, "hidden": 13}, LENGTHS, True),
    ({"variant": "NP"}, LENGTHS, False),
    ({"variant": "CIFG", "use_peepholes": True}, LENGTHS, True),
    ({"variant": "CIFG", "cell_clip": 0.5}, None, False),
    ({"variant": "FGR", "use_peepholes": True}, LENGTHS, True),
    ({"variant": "FGR", "cell_clip": 0.5, "hidden": 13}, None, False),
], ids=["defaults", "peepholes-lengths-state", "peepholes-clip", "clip-no-forget-bias", "hidden-13", "NIG",
        "NFG-clip", "NOG", "NIAF", "NOAF-hidden-13", "NP", "CIFG", "CIFG-clip", "FGR", "FGR-clip-hidden-13"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_the_kernel_matches_the_cell_in_float64(options, lengths, with_state, input_grad, eager_compile):
    """As close to exact arithmetic as the float32 cell: within 3x its worst relative error (+1e-6), for every tensor."""
    x = torch.randn(B, T, IN, generator=torch.Generator().manual_seed(2))
    exact = _run(_cell(**options).double(), x, lengths, with_state, input_grad)
    generic = _run(_cell(**options), x, lengths, with_state, input_grad)
    cell = _cell(**options)
    cell.sequence_runner = ChunkRunner(4)
    kernel = _run(cell, x, lengths, with_state, input_grad)
    assert cell.sequence_runner.kernel_calls == 1 and cell.sequence_runner.compiled_calls == 0, "the kernel ran"
    if lengths is not None:
        assert (kernel[0][1, 4:] == 0).all(), "steps past a sequence's length output zeros"
    if "cell_clip" in options:
        clipped = (exact[2].abs() >= 0.5 - 1e-12).float().mean().item()
        assert 0.05 < clipped < 0.95, f"the clip must bite for this test to mean anything ({clipped:.2f} clipped)"
    assert_as_close_as_float32(exact, generic, kernel)


@UNEVEN_TILES
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_the_kernel_matches_the_cell_where_its_gemm_tiles_split_unevenly(batch, hidden, threads, inputs, input_grad,
                                                                         eager_compile):
    """The per-step GEMMs run in tiles of 6 batch rows by 64 weight columns (on AVX-512), the column panels split
    over the threads (and each panel's rows too where the panels do not divide among them), or each thread its own
    rows (rows apart, the kernel_threads fixture): batches and widths that leave part-filled tiles, panel counts the
    threads do not divide, and both routes match float64 as closely as the cell does; with an input gradient (the
    gates' gradient kept for it) and without (only each step's rows kept)."""
    run = functools.partial(_run, input_grad=input_grad)
    check_uneven_tiles(_cell, run, lambda c: c.sequence_runner.kernel_calls, batch, hidden, threads, inputs or IN)


def test_a_long_sequence_keeps_the_bias_gradients_precision(eager_compile):
    """The bias' gradient sums every row and step (here 9,600 per thread's share): the kernel's sum stays within 3x the
    float32 cell's own error of the float64 one (+1e-6)."""
    torch.manual_seed(0)
    cell = LSTMCell(3, 16)
    x = torch.randn(48, 400, 3, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in ("float64", "generic", "kernel"):
        c = copy.deepcopy(cell).double() if run == "float64" else copy.deepcopy(cell)
        if run == "kernel":
            c.sequence_runner = ChunkRunner(4)
        out, _ = c.forward_sequence(x.to(c.weight_hh.dtype))
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append(c.bias_hh.grad.double())
        if run == "kernel":
            assert c.sequence_runner.kernel_calls == 1
    exact, generic, kernel = grads
    scale = exact.abs().max().item()
    bound = 3 * ((generic - exact).abs().max().item() / scale) + 1e-6
    assert (kernel - exact).abs().max().item() / scale <= bound


def test_a_bidirectional_peephole_stack_runs_every_cell_through_the_kernel(eager_compile):
    torch.manual_seed(0)
    model = {"hidden_size": H, "num_layers": 2, "bidirectional": True, "fused": "never"}
    cells = build_model({"cell": {"name": "lstm", "use_peepholes": True}, "model": model}, IN, 3)
    reference = copy.deepcopy(cells).double()
    compiling.install(cells, chunk=4)
    x = torch.randn(B, T, IN)
    outs, grads = [], []
    for m, xx in ((reference, x.double()), (cells, x)):
        m.zero_grad(set_to_none=True)
        out = m(xx, LENGTHS)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert [c.sequence_runner.kernel_calls for c in compiling.step_cells(cells)] == [1, 1, 1, 1]
    assert_close(outs[1], outs[0], 2e-6, "outputs")
    for name, grad in grads[0].items():
        scale = max(1.0, grad.abs().max().item())
        assert_close(grads[1][name] / scale, grad / scale, 2e-5, f"grad {name}")


class ChangedStep(LSTMCell):
    def _step(self, xp_t, state, weight_hh, bias_hh):  # noqa: ANN001 - a user's variant of the step
        h, c = super()._step(xp_t, state, weight_hh, bias_hh)
        return h * 0.5, (c[0] * 0.5, c[1])


@pytest.mark.parametrize("case", ["projection", "activation", "subclass", "float64", "no-grad",
                                  "autocast", "switched-off", "per-step-grad", "learned-forget-bias"])
def test_the_kernel_runs_only_where_it_computes_the_same_thing(case, eager_compile, monkeypatch):
    options = {"projection": {"num_proj": 8}, 
               "activation": {"activation": "relu"}}.get(case, {})
    cell = ChangedStep(IN, H) if case == "subclass" else _cell(**options)
    if case == "float64":
        cell = cell.double()
    if case == "switched-off":
        monkeypatch.setattr(ln_lstm_kernel, "ENABLED", False)
    if case == "per-step-grad":
        cell.batched_weight_grad = False
    if case == "learned-forget-bias":  # a user's tensor where the cell has a number: the kernel would drop its grad
        cell.forget_bias = torch.nn.Parameter(torch.tensor(1.0))
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, IN, dtype=cell.weight_hh.dtype)
    if case == "no-grad":
        with torch.no_grad():
            cell.forward_sequence(x)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cell.forward_sequence(x)
    else:
        cell.forward_sequence(x)
    assert cell.sequence_runner.kernel_calls == 0
    assert not lstm_kernel.applies(cell, "cpu", cell.weight_hh.dtype, None) or case in ("no-grad", "autocast")


def test_gradients_are_first_order_and_a_retained_graph_keeps_its_buffers(eager_compile):
    cell = _cell(use_peepholes=True)
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, IN, requires_grad=True)
    out, _ = cell.forward_sequence(x)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        gx.sum().backward()

    generic = copy.deepcopy(cell)
    del generic.__dict__["sequence_runner"]
    grads = []
    for c in (cell, generic):  # retain_graph, another sequence, then a backward through both graphs
        c.zero_grad()
        out1, _ = c.forward_sequence(x)
        out1.pow(2).sum().backward(retain_graph=True)
        out2, _ = c.forward_sequence(2 * x)
        (out1 * out2).mean().backward()
        grads.append(c.weight_hh.grad.clone())
    assert cell.sequence_runner.kernel_calls == 3
    scale = grads[1].abs().max()
    assert_close(grads[0] / scale, grads[1] / scale, 2e-5, "W_hh grad: the retained graph read its own buffers")


def test_saved_tensor_hooks_cannot_make_a_graph_read_reused_buffers(eager_compile):
    """save_on_cpu keeps CPU tensors as they are, skipping autograd's version check: buffers must not be reused."""
    cell = _cell(use_peepholes=True)
    cell.sequence_runner = ChunkRunner(4)
    generic = copy.deepcopy(cell)
    del generic.__dict__["sequence_runner"]
    x = torch.randn(B, T, IN)
    grads = []
    for c in (cell, generic):
        with torch.autograd.graph.save_on_cpu():
            out1, _ = c.forward_sequence(x)
            loss1 = out1.pow(2).sum()
            loss1.backward(retain_graph=True)
            c.forward_sequence(2 * x)[0].sum().backward()
        c.zero_grad()
        loss1.backward()
        grads.append(c.weight_hh.grad.clone())
    scale = grads[1].abs().max()
    assert_close(grads[0] / scale, grads[1] / scale, 2e-5, "W_hh grad of the first graph, read again")


def test_a_training_loop_reuses_the_buffers_once_the_step_s_graph_is_dropped(eager_compile):
    cell = _cell(use_peepholes=True)
    cell.sequence_runner = ChunkRunner(4)
    lstm_kernel.WORKSPACE.clear()
    x = torch.randn(B, T, IN)
    seen = []
    for _ in range(3):
        out = cell.forward_sequence(x)[0]  # the state's tensors would keep the graph too
        out.sum().backward()
        seen.append(sorted(t.data_ptr() for ts in lstm_kernel.WORKSPACE._free.values() for t in ts))
        del out
    free = sorted(t.data_ptr() for ts in lstm_kernel.WORKSPACE._free.values() for t in ts)
    assert free and set(seen[-1]) < set(free), "the dropped graph's buffers are free again"
    out = cell.forward_sequence(x)[0]
    assert len(sorted(t.data_ptr() for ts in lstm_kernel.WORKSPACE._free.values() for t in ts)) < len(free), "and reused"


def test_nan_stays_nan_as_in_the_cell(eager_compile):
    x = torch.randn(B, T, IN)
    x[0, 2, 0] = float("nan")
    cell = _cell(use_peepholes=True, cell_clip=3.0)
    reference = copy.deepcopy(cell)
    cell.sequence_runner = ChunkRunner(4)
    out, (h, c) = cell.forward_sequence(x)
    expected, _ = reference.forward_sequence(x)
    assert cell.sequence_runner.kernel_calls == 1
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out[0, 2:]).all()
    assert torch.isnan(h[0]).all() and torch.isfinite(out[1:]).all()


def test_training_peephole_lstm_with_compile_true_runs_the_kernel():
    class Seen(Callback):
        def on_train_begin(self, info: dict[str, Any]) -> None:
            self.info = info

    seen = Seen()
    result = train(compose_config([*TINY, "cell=lstm", "cell.use_peepholes=true", "model.compile=true",
                                   "task.train_size=96", "train.batch_size=32", "train.epochs=2",
                                   "task.seq_len=12"]), callbacks=[seen])
    runner = compiling.step_cells(seen.info["model"])[0].sequence_runner
    assert runner.kernel_calls == 6 and runner.compiled_calls == 0  # 3 batches x 2 epochs; nothing for inductor
    assert "cell(s) run a fused CPU kernel" in seen.info["compile"]
    assert result["test/mse"] == result["test/mse"]  # finite, not NaN


def test_auto_runs_a_loaded_kernel_even_for_sequences_shorter_than_a_chunk(monkeypatch):
    """A kernel runs every step (compiled chunks only full chunks): a loaded one costs nothing, so auto takes it."""
    model = build_model({"cell": {"name": "lstm", "use_peepholes": True}, "model": {"hidden_size": 8}}, 2, 1)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    monkeypatch.setattr(ln_lstm_kernel, "is_loaded", lambda: True)
    decision = compiling.prepare(model, "auto", optimizer_steps=10, seq_len=12, batch_size=4, masked=False,
                                 device="cpu")
    assert decision.compile and "1 cell(s) run a fused CPU kernel" in decision.reason
    assert "budget of 120 recurrent steps" in decision.reason
