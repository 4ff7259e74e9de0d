"""``ln_lstm``'s fused CPU kernel computes what the cell computes (correctness only, no timing).

Against the generic cell-by-cell path in float64 (exact arithmetic, for the float32 kernel's
rounding to be measured against): outputs, final states and every gradient, with lengths, both
directions, a given initial state and options away from their defaults. Where the kernel must not
run (a subclass changing the step, float64, autocast, no grad, the switch off), it does not; a
failed build warns and falls back; the workspace never hands a live buffer out twice. The first
test to load the kernel builds it (about a minute) into the shared cache.
"""

from __future__ import annotations

import copy
import functools
import gc
import threading
from typing import Any, Optional

import pytest
import torch

from conftest import (TINY, UNEVEN_TILES, assert_as_close_as_float32, assert_close, check_uneven_tiles,
                      compose_config)
from rnnsearch import build_model, train
from rnnsearch import compile as compiling
from rnnsearch.callbacks import Callback
from rnnsearch.cells import ln_lstm_kernel
from rnnsearch.cells.ln_lstm import LayerNormLSTMCell
from rnnsearch.compile import ChunkRunner, decide

pytestmark = pytest.mark.usefixtures("kernel_threads")  # each test on one thread, two, and rows apart

B, T, IN, H = 5, 23, 7, 24
LENGTHS = torch.tensor([23, 4, 17, 1, 22])  # unsorted, one of length 1


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile returns the function itself: the generic 'compiled' path runs eagerly, fast."""
    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)


def _cell(hidden: int = H, inputs: int = IN, **options: Any) -> LayerNormLSTMCell:
    torch.manual_seed(0)
    cell = LayerNormLSTMCell(inputs, hidden, **options)
    with torch.no_grad():  # gains and biases away from their initial ones, so each gradient path is exercised
        for p in (cell.ln_ih_weight, cell.ln_hh_weight, cell.ln_c_weight):
            p.uniform_(0.5, 1.5)
        cell.ln_c_bias.uniform_(-0.3, 0.3)
    return cell


def _run(cell: LayerNormLSTMCell, x: torch.Tensor, lengths: Optional[torch.Tensor], with_state: bool,
         input_grad: bool = True):
    """Outputs, final state and the gradients of a loss on all three, w.r.t. input (unless not ``input_grad``: the
    kernel then stores the input products' gradient by panels for ``W_ih``'s alone), state and parameters."""
    x = x.to(cell.weight_hh.dtype).clone().requires_grad_(input_grad)
    cell.zero_grad(set_to_none=True)
    state = None
    if with_state:
        g = torch.Generator().manual_seed(1)
        state = tuple((0.5 * torch.randn(x.shape[0], cell.hidden_size, generator=g)).to(x.dtype).requires_grad_()
                      for _ in range(2))
    out, (h, c) = cell.forward_sequence(x, state, lengths)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    ((out * w).sum() + (h * h).sum() + 0.3 * c.sum()).backward()
    grads = {**({"x": x.grad} if input_grad else {}), **{n: p.grad for n, p in cell.named_parameters()}}
    if with_state:
        grads.update(h0=state[0].grad, c0=state[1].grad)
    return out.detach(), h.detach(), c.detach(), grads


def _kernel_calls(cell: LayerNormLSTMCell) -> int:
    return cell.sequence_runner.kernel_calls


@pytest.mark.parametrize("options,lengths,with_state", [
    ({}, None, False),
    ({"forget_bias": 0.3, "eps": 1e-3}, LENGTHS, True),
    ({"forget_bias": 0.0}, LENGTHS, False),
    ({"hidden": 13}, LENGTHS, True),  # not a multiple of the vector width: the scalar tails
], ids=["defaults", "options-lengths-state", "lengths", "hidden-13"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_the_kernel_matches_the_cell_in_float64(options, lengths, with_state, input_grad, eager_compile):
    """As close to exact arithmetic as the float32 cell: within 3x its worst relative error (+1e-6), for every tensor."""
    x = torch.randn(B, T, IN, generator=torch.Generator().manual_seed(2))
    exact = _run(_cell(**options).double(), x, lengths, with_state, input_grad)
    generic = _run(_cell(**options), x, lengths, with_state, input_grad)
    cell = _cell(**options)
    cell.sequence_runner = ChunkRunner(4)
    kernel = _run(cell, x, lengths, with_state, input_grad)
    assert _kernel_calls(cell) == 1 and cell.sequence_runner.compiled_calls == 0, "the kernel ran, not inductor"
    if lengths is not None:
        assert (kernel[0][1, 4:] == 0).all(), "steps past a sequence's length output zeros"
    assert_as_close_as_float32(exact, generic, kernel)


@UNEVEN_TILES
@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_the_kernel_matches_the_cell_where_its_gemm_tiles_split_unevenly(batch, hidden, threads, inputs, input_grad,
                                                                         eager_compile):
    """As for lstm's kernel (tests/test_lstm_kernel.py): part-filled GEMM tiles and panels, and both thread splits,
    match float64 as closely as the cell does; here with the input's products a GEMM of each step's too, and their
    gradient stored by panels where the input needs none."""
    run = functools.partial(_run, input_grad=input_grad)
    check_uneven_tiles(_cell, run, _kernel_calls, batch, hidden, threads, inputs or IN)


def test_a_frozen_input_weight_runs_the_kernel_and_the_other_gradients_hold(eager_compile):
    """W_ih frozen: the kernel still runs (it skips W_ih's gradient), and every other tensor is as close to float64 as
    the float32 cell's."""
    x = torch.randn(B, T, IN, generator=torch.Generator().manual_seed(2))
    options = {"forget_bias": 0.3, "eps": 1e-3}  # as the float64 test's "options-lengths-state"
    cells = [_cell(**options).double(), _cell(**options), _cell(**options)]
    for cell in cells:
        cell.weight_ih.requires_grad_(False)
    cells[2].sequence_runner = ChunkRunner(4)
    exact, generic, kernel = (_run(cell, x, LENGTHS, True) for cell in cells)
    assert _kernel_calls(cells[2]) == 1
    assert all(run[3].pop("weight_ih") is None for run in (exact, generic, kernel))
    assert_as_close_as_float32(exact, generic, kernel)


def test_a_bidirectional_stack_runs_every_cell_through_the_kernel(eager_compile):
    torch.manual_seed(0)
    model = {"hidden_size": H, "num_layers": 2, "bidirectional": True, "fused": "never"}
    cells = build_model({"cell": {"name": "ln_lstm"}, "model": model}, IN, 3)
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


class ChangedStep(LayerNormLSTMCell):
    def _step(self, xp_t, state, weight_hh, slot_t):  # noqa: ANN001 - a user's variant of the step
        h, c = super()._step(xp_t, state, weight_hh, slot_t)
        return h * 0.5, (c[0] * 0.5, c[1])


@pytest.mark.parametrize("case", ["subclass", "float64", "no-grad", "autocast", "switched-off", "per-step-grad",
                                  "learned-forget-bias"])
def test_the_kernel_runs_only_where_it_computes_the_same_thing(case, eager_compile, monkeypatch):
    cell = ChangedStep(IN, H) if case == "subclass" else _cell()
    if case == "float64":
        cell = cell.double()
    if case == "switched-off":
        monkeypatch.setattr(ln_lstm_kernel, "ENABLED", False)
    if case == "per-step-grad":
        cell.batched_weight_grad = False  # needed for double backward: the kernel is first-order only
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
    assert _kernel_calls(cell) == 0
    if case == "subclass":  # and the subclass's own step is what ran
        base = LayerNormLSTMCell(IN, H)
        base.load_state_dict(cell.state_dict())
        out, base_out = cell.forward_sequence(x)[0].detach(), base.forward_sequence(x)[0].detach()
        assert_close(out[:, :1], 0.5 * base_out[:, :1], 1e-6, "the first step, halved")


def test_gradients_are_first_order_and_a_retained_graph_keeps_its_buffers(eager_compile):
    cell = _cell()
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
    cell = _cell()
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
    cell = _cell()
    cell.sequence_runner = ChunkRunner(4)
    ln_lstm_kernel.WORKSPACE.clear()
    x = torch.randn(B, T, IN)
    seen = []
    for _ in range(3):
        out = cell.forward_sequence(x)[0]  # the state's tensors would keep the graph too
        out.sum().backward()
        seen.append(sorted(t.data_ptr() for ts in ln_lstm_kernel.WORKSPACE._free.values() for t in ts))
        del out
    free = sorted(t.data_ptr() for ts in ln_lstm_kernel.WORKSPACE._free.values() for t in ts)
    assert free and set(seen[-1]) < set(free), "the dropped graph's buffers are free again"
    out = cell.forward_sequence(x)[0]
    assert len(sorted(t.data_ptr() for ts in ln_lstm_kernel.WORKSPACE._free.values() for t in ts)) < len(free), "and reused"


def test_the_workspace_reuses_buffers_of_the_latest_shapes_only():
    ws = ln_lstm_kernel.Workspace()
    like = torch.empty(0)
    a, b = ws.take([(2, 3), (2, 3)], like)
    assert a.data_ptr() != b.data_ptr()
    ws.give([a, b])
    version = a._version
    c, d = ws.take([(2, 3), (2, 3)], like)
    assert {c.data_ptr(), d.data_ptr()} == {a.data_ptr(), b.data_ptr()}, "reused"
    assert max(c._version, d._version) > version, "a reused buffer's version is bumped"
    ws.give([c, d])
    (e,) = ws.take([(4,)], like)  # a new shape: the others are dropped, not kept forever
    assert e.shape == (4,) and not any(k[0] == (2, 3) for k in ws._free)


def test_a_failed_build_warns_and_runs_the_generic_path(tmp_path, monkeypatch, eager_compile):
    broken = tmp_path / "ln_lstm.cpp"
    broken.write_text("#error this kernel does not build\n")
    monkeypatch.setenv("RNNSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ln_lstm_kernel, "SOURCE", broken)
    monkeypatch.setattr(ln_lstm_kernel, "_ext", None)
    monkeypatch.setattr(ln_lstm_kernel, "_failed", None)
    cell = _cell()
    plain = copy.deepcopy(cell)
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, IN)
    with pytest.warns(RuntimeWarning, match="could not be built"):
        out, _ = cell.forward_sequence(x)
    assert _kernel_calls(cell) == 0 and cell.sequence_runner.compiled_calls > 0
    assert_close(out.detach(), plain.forward_sequence(x)[0].detach(), 1e-6, "generic path's output")
    assert not ln_lstm_kernel.applies(cell, "cpu", torch.float32, None), "and it is not tried again"


def test_auto_counts_the_kernel_build_once_not_a_compile_per_shape(monkeypatch):
    cfg = {"cell": {"name": "ln_lstm"}, "model": {"hidden_size": 8, "num_layers": 2, "bidirectional": True}}
    model = build_model(cfg, 2, 1)
    args = dict(seq_len=20, batch_size=16, masked=False, device="cpu")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    monkeypatch.setattr(ln_lstm_kernel, "is_built", lambda: False)
    monkeypatch.setattr(ln_lstm_kernel, "is_loaded", lambda: False)
    cold = compiling.prepare(model, "auto", optimizer_steps=1000, **args)  # 80,000 kernel steps: 32 s < 1.5 x 90 s
    assert not cold.compile and "(0 new, 0 cached cell shape(s); fused CPU kernels to build)" in cold.reason
    monkeypatch.setattr(ln_lstm_kernel, "is_built", lambda: True)
    warm = compiling.prepare(model, "auto", optimizer_steps=1000, **args)
    assert warm.compile and "fused CPU kernels built" in warm.reason and "4 cell(s) run a fused CPU kernel" \
        in warm.reason
    assert decide("auto", cells=4, recur_steps=80_000, new_shapes=0, cached_shapes=0, device_type="cpu",
                  kernel_cells=4, kernel_built=False).compile is False
    assert decide("auto", cells=4, recur_steps=5_000, new_shapes=0, cached_shapes=0, device_type="cpu",
                  kernel_cells=4, kernel_built=True).compile is False  # 2 s < 1.5 x 2 s to load
    assert decide("auto", cells=4, recur_steps=10_000, new_shapes=0, cached_shapes=0, device_type="cpu",
                  kernel_cells=4, kernel_built=True).compile is True  # a kernel step saves 4e-4 s: 4 s > 3 s
    loaded = decide("auto", cells=4, recur_steps=100, new_shapes=0, cached_shapes=0, device_type="cpu",
                    kernel_cells=4, kernel_built=True, kernel_loaded=True)  # this process has it: nothing to pay
    assert loaded.compile and "fused CPU kernels loaded" in loaded.reason
    assert decide("auto", cells=4, recur_steps=10**6, new_shapes=0, cached_shapes=0, device_type="cpu",
                  kernel_cells=4, kernel_built=False).compile is True
    amp = compiling.prepare(model, "auto", optimizer_steps=1000, amp=torch.bfloat16, **args)  # inductor's graphs
    assert "(2 new, 2 cached cell shape(s))" in amp.reason


def test_training_with_compile_true_runs_ln_lstm_through_the_kernel():
    class Seen(Callback):
        def on_train_begin(self, info: dict[str, Any]) -> None:
            self.info = info

    seen = Seen()
    result = train(compose_config([*TINY, "cell=ln_lstm", "model.compile=true", "task.train_size=96",
                                   "train.batch_size=32", "train.epochs=2", "task.seq_len=12"]), callbacks=[seen])
    runner = compiling.step_cells(seen.info["model"])[0].sequence_runner
    assert runner.kernel_calls == 6 and runner.compiled_calls == 0  # 3 batches x 2 epochs; nothing for inductor
    assert "cell(s) run a fused CPU kernel" in seen.info["compile"]
    assert result["test/mse"] == result["test/mse"]  # finite, not NaN


@pytest.mark.parametrize("hidden", [16, 13], ids=["vector-lanes", "with-tails"])
def test_nan_stays_nan_as_in_the_cell(hidden, eager_compile):
    """exp_u20 clamps NaN to a finite number: a diverged run must still show NaN (TrainingDiverged prunes on it)."""
    x = torch.randn(B, T, IN)
    x[0, 2, 0] = float("nan")
    cell = _cell(hidden)
    reference = copy.deepcopy(cell)
    cell.sequence_runner = ChunkRunner(4)
    out, (h, c) = cell.forward_sequence(x)
    expected, _ = reference.forward_sequence(x)
    assert _kernel_calls(cell) == 1
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out[0, 2:]).all()
    assert torch.isnan(h[0]).all() and torch.isfinite(out[1:]).all()


def test_non_contiguous_parameters_run_the_kernel_too(eager_compile):
    cell = _cell()
    reference = copy.deepcopy(cell)
    with torch.no_grad():
        for name in ("ln_ih_weight", "bias", "ln_c_weight"):  # the same values, stride 2
            p = getattr(cell, name)
            wide = torch.zeros(2 * p.numel())
            wide[::2] = p
            setattr(cell, name, torch.nn.Parameter(wide[::2]))
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, IN)
    out, _ = cell.forward_sequence(x, lengths=LENGTHS)
    out.sum().backward()
    expected, _ = reference.forward_sequence(x, lengths=LENGTHS)
    expected.sum().backward()
    assert _kernel_calls(cell) == 1
    assert_close(out.detach(), expected.detach(), 2e-6, "outputs")
    scale = max(1.0, reference.bias.grad.abs().max().item())  # a sum over every row and step: relative
    assert_close(cell.bias.grad / scale, reference.bias.grad / scale, 2e-5, "bias grad")


def test_a_second_backward_hands_nothing_back_twice(eager_compile):
    """retain_graph, two backwards, then two sequences at once: no buffer goes to both of them."""
    ln_lstm_kernel.WORKSPACE.clear()
    cell = _cell()
    cell.sequence_runner = ChunkRunner(4)
    x = torch.randn(B, T, IN)
    out, _ = cell.forward_sequence(x)
    loss = out.pow(2).sum()
    loss.backward(retain_graph=True)
    first = cell.weight_hh.grad.clone()
    loss.backward()
    assert_close(cell.weight_hh.grad / first.abs().max(), 2 * first / first.abs().max(), 1e-6, "second backward")
    free = [id(t) for ts in ln_lstm_kernel.WORKSPACE._free.values() for t in ts]
    assert len(free) == len(set(free)), "a buffer is free twice"
    o1, _ = cell.forward_sequence(x)
    o2, _ = cell.forward_sequence(x)
    cell.zero_grad()
    (o1.sum() + o2.sum()).backward()  # raised autograd's in-place error when a buffer served both
    single = copy.deepcopy(cell)
    del single.__dict__["sequence_runner"]
    single.zero_grad()
    (2 * single.forward_sequence(x)[0].sum()).backward()
    scale = single.weight_hh.grad.abs().max()
    assert_close(cell.weight_hh.grad / scale, single.weight_hh.grad / scale, 2e-5, "two sequences' gradient")


def test_a_frozen_recurrent_weight_is_counted_as_inductor_s(monkeypatch):
    """The kernel needs W_hh's gradient (its batched route); frozen, the cell compiles inductor's graphs."""
    model = build_model({"cell": {"name": "ln_lstm"}, "model": {"hidden_size": 8, "num_layers": 1}}, 2, 1)
    cell = compiling.step_cells(model)[0]
    cell.weight_hh.requires_grad_(False)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    decision = compiling.prepare(model, "auto", optimizer_steps=10, seq_len=20, batch_size=16, masked=False,
                                 device="cpu")
    assert "(1 new, 0 cached cell shape(s))" in decision.reason and "kernel" not in decision.reason


def test_a_graph_freed_by_the_collector_inside_take_hands_back_without_deadlock(monkeypatch):
    """Buffers go back when their node is freed, which the cyclic collector may do while take() holds the lock."""
    ws = ln_lstm_kernel.Workspace()

    class Node:
        pass

    node = Node()
    node.cycle = node  # only the collector frees it
    ws.give_when_freed(node, [torch.empty(3)])
    del node
    real_empty = torch.empty

    def empty_collecting(*args: Any, **kwargs: Any) -> torch.Tensor:
        gc.collect()
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_collecting)
    worker = threading.Thread(target=lambda: ws.take([(5,)], real_empty(0)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "take() deadlocked on its own lock"
    assert [len(v) for k, v in ws._free.items() if k[0] == (3,)] == [1], "the collected node's buffer is free"


@pytest.mark.parametrize("m,k,n", [(64, 256, 1024), (13, 40, 100), (1, 7, 3)])
def test_the_kernels_gemm_matches_torch_mm(m, k, n):
    """packed_mm, the kernels' per-step GEMM over a whole matrix (AVX-512's micro-kernel, else at::mm), as torch.mm,
    with its right-hand side stored either way, computed once or over one packing several times."""
    ext = ln_lstm_kernel.load()
    if ext is None:
        pytest.skip("the kernel extension could not be built here")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    expected = torch.mm(a.double(), b.double())
    for got in (ext.packed_mm(a, b, False), ext.packed_mm(a, b.t().contiguous(), True), ext.packed_mm(a, b, False, 3)):
        assert got.shape == (m, n)
        assert (got.double() - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("rows,m,n,threads", [(1100, 40, 160, 2), (1100, 40, 160, 3), (600, 288, 1024, 2),
                                              (700, 13, 50, 2), (5, 7, 3, 1), (0, 4, 5, 2)],
                         ids=["3-panels", "3-threads", "lstm-256", "1-panel-2-threads", "tiny-1-thread", "no-rows"])
def test_the_kernels_weight_gradient_gemm_matches_torch_mm(rows, m, n, threads):
    """gemm_tn, x^T @ y over a sequence's rows (the weights' gradients): blocks of rows not a multiple of its block,
    part-filled tiles and panels, panels split over threads unevenly (then rows too), and no rows at all."""
    ext = ln_lstm_kernel.load()
    if ext is None:
        pytest.skip("the kernel extension could not be built here")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, m, generator=g), torch.randn(rows, n, generator=g)
    kept = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ext.gemm_tn(x, y)
    finally:
        torch.set_num_threads(kept)
    expected = torch.mm(x.double().t(), y.double())
    assert got.shape == (m, n)
    assert (got.double() - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("bad", ["zoneout-shape", "state-dropout-shape", "both"])
def test_the_kernel_refuses_zoneout_or_state_dropout_tensors_that_do_not_fit(bad):
    """A mask of another sequence's shape would be read out of bounds: the kernel says so instead."""
    cell = _cell()
    x = torch.randn(B, T, IN)
    h0 = torch.zeros(B, cell.hidden_size)
    fits, wrong, none = torch.ones(T, B, cell.hidden_size), torch.ones(T, B - 1, cell.hidden_size), torch.empty(0)
    zh, zc, mh = {"zoneout-shape": (wrong, fits, none), "state-dropout-shape": (none, none, wrong),
                  "both": (fits, fits, fits)}[bad]
    with pytest.raises(RuntimeError, match="zoneout" if bad != "both" else "zoneout and state dropout in one call"):
        ln_lstm_kernel.LNLSTMSequence.apply(x, cell.weight_ih, h0, h0, cell.weight_hh, cell.ln_ih_weight,
                                            cell.ln_hh_weight, cell.bias, cell.ln_c_weight, cell.ln_c_bias,
                                            torch.empty(0, dtype=torch.bool), zh, zc, mh, 1.0, 1e-5)
