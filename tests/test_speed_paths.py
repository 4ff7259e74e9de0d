"""The speed paths compute the same thing (correctness only, no timing).

The eager and the compiled cell-by-cell paths give the fused path's outputs and
gradients for the same weights; packed variable-length sequences on the fused
path match the padded, masked cell-by-cell result; ``model.compile=false``
never compiles; ``auto``'s decision is a pure function of budget and cache.
Compiling tests are ``slow`` and use a tiny shape with a short chunk.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from typing import Any

import pytest
import torch

from conftest import TINY, assert_close, compose_config
from rnnsearch import ConfigError, build_model, train
from rnnsearch.callbacks import Callback
from rnnsearch.cells import ln_lstm_kernel
from rnnsearch import compile as compiling
from rnnsearch.compile import COSTS, MARGIN, ChunkRunner, decide
from rnnsearch.tasks.base import Batch
from rnnsearch.train import _lengths, amp_dtype
from test_model import IN, OUT, H, copy_cells_to_fused

LENGTHS = torch.tensor([9, 3, 7, 1])  # unsorted, one of length 1


def _pair(cell: dict[str, Any], num_layers: int, bidirectional: bool, compile: str = "false"):
    """The same weights as a cell-by-cell model and as a fused model (float64, training mode)."""
    model = {"hidden_size": H, "num_layers": num_layers, "bidirectional": bidirectional, "compile": compile}
    cells = build_model({"cell": cell, "model": {**model, "fused": "never"}}, IN, OUT).double()
    fused = build_model({"cell": cell, "model": {**model, "fused": "always"}}, IN, OUT).double()
    copy_cells_to_fused(cells, fused)
    for m in (cells, fused):
        m.per_step = True
    return cells, fused


def _outputs_and_grads(model, x, lengths):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x, lengths)  # (b, t, out)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_grads(cells, fused, g_cells, g_fused):
    """Compare parameter gradients by the fused module's names (forget_bias folding does not change grads)."""
    assert_close(g_cells["head.weight"], g_fused["head.weight"], what="grad head.weight")
    assert_close(g_cells["encoder.weight"], g_fused["encoder.weight"], what="grad encoder.weight")
    rnn = fused.stack.rnn
    for k, layer in enumerate(cells.stack.layers):
        pairs = [(layer.fw.cell, ""), (layer.bw.cell, "_reverse")] if hasattr(layer, "fw") else [(layer.cell, "")]
        for cell, sfx in pairs:
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                mine = getattr(cell, name).grad
                theirs = getattr(rnn, f"{name}_l{k}{sfx}").grad
                assert_close(mine, theirs, what=f"grad {name} layer {k}{sfx}")


CASES = [({"name": "lstm", "forget_bias": 1.0}, 1, False), ({"name": "lstm", "forget_bias": 0.0}, 2, True),
         ({"name": "gru"}, 2, False), ({"name": "rnn"}, 1, True)]


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("cell,layers,bi", CASES, ids=["lstm", "lstm-2-bi", "gru-2", "rnn-bi"])
def test_eager_cell_path_gives_the_fused_outputs_and_gradients(cell, layers, bi, with_lengths):
    cells, fused = _pair(cell, layers, bi)
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64)
    lengths = LENGTHS if with_lengths else None
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, lengths)
    out_f, gx_f, g_f = _outputs_and_grads(fused, x, lengths)
    assert_close(out_c, out_f, what="outputs")
    assert_close(gx_c, gx_f, what="input gradient")
    _assert_same_grads(cells, fused, g_c, g_f)


@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_packed_fused_path_matches_the_padded_cell_path(bi):
    """Packed sequences (CPU lengths, as Batch.cpu_lengths gives them) equal masked padding."""
    cells, fused = _pair({"name": "lstm"}, 2, bi)
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64)  # padding holds random values: they must not matter
    pad = torch.arange(9).unsqueeze(0) >= LENGTHS.unsqueeze(1)  # (b, t)
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, LENGTHS)
    out_f, gx_f, g_f = _outputs_and_grads(fused, x, LENGTHS.cpu())
    head_bias = cells.head.bias.detach().expand(int(pad.sum()), -1)
    assert_close(out_c[pad], head_bias, what="padded steps (the head of a zero output)")
    assert_close(out_c, out_f, what="outputs")
    assert_close(gx_c, gx_f, what="input gradient")
    assert not gx_c[pad].any(), "no gradient reaches padding"
    _assert_same_grads(cells, fused, g_c, g_f)
    with torch.no_grad():  # forward: NaN padding stays out of every real output
        nan_x = x.masked_fill(pad.unsqueeze(2), float("nan"))
        assert_close(cells(nan_x, LENGTHS).masked_fill(pad.unsqueeze(2), 0), out_c.masked_fill(pad.unsqueeze(2), 0),
                     what="outputs with NaN padding")


@pytest.mark.parametrize("cell,bi", [({"name": "lstm"}, True), ({"name": "gru"}, False)], ids=["lstm-bi", "gru"])
def test_empty_sequences_give_the_cell_paths_result_on_the_fused_path(cell, bi):
    """Length 0 (which packing refuses): zero outputs, the initial state kept — as the cell path does."""
    cells, fused = _pair(cell, 2, bi)
    lengths = torch.tensor([9, 0, 4, 0])
    x = torch.randn(4, 9, IN, dtype=torch.float64)
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, lengths)
    out_f, gx_f, g_f = _outputs_and_grads(fused, x, lengths)
    assert_close(out_f, out_c, what="outputs")
    assert_close(gx_f, gx_c, what="input gradient")
    _assert_same_grads(cells, fused, g_c, g_f)
    h = cells.encoder(x)
    layers, width = 2 * (2 if bi else 1), fused.stack.rnn.hidden_size
    start = torch.randn(layers, 4, width, dtype=torch.float64)
    state = (start, torch.randn_like(start)) if cell["name"] == "lstm" else start
    out, last, finals = fused.stack(h, lengths, state)
    assert not out[1].any() and not out[3].any() and not last[1].any(), "an empty sequence outputs nothing"
    for got, initial in zip(finals if isinstance(finals, tuple) else (finals,), state if isinstance(state, tuple)
                            else (state,)):
        assert torch.equal(got[:, [1, 3]], initial[:, [1, 3]]), "an empty sequence keeps its initial state"
        assert not torch.equal(got[:, [0, 2]], initial[:, [0, 2]])


def test_full_length_lengths_skip_packing_and_change_nothing(monkeypatch):
    _, fused = _pair({"name": "gru"}, 1, True)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    expected = fused(x, None)
    monkeypatch.setattr("rnnsearch.fused.pack_padded_sequence", lambda *a, **k: pytest.fail("packed"))
    assert_close(fused(x, torch.full((3,), 5)), expected, what="full lengths")


def test_training_passes_the_cpu_lengths_to_the_fused_path_only():
    batch = Batch(torch.zeros(2, 3), torch.zeros(2), lengths=torch.tensor([3, 1]), cpu_lengths=torch.tensor([3, 1]))
    fused = build_model({"cell": {"name": "lstm"}, "model": {"hidden_size": 4}}, 1, 1)
    cells = build_model({"cell": {"name": "lstm"}, "model": {"hidden_size": 4, "fused": "never"}}, 1, 1)
    assert _lengths(fused, batch) is batch.cpu_lengths and _lengths(cells, batch) is batch.lengths


def test_variable_length_batches_carry_a_cpu_copy_of_their_lengths():
    from rnnsearch import create_task

    cfg = compose_config(["task=tagging"])

    task = create_task({**dict(cfg.task), "train_size": 40})
    for batch in task.batches("train", 16, "cpu", shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert batch.cpu_lengths is not None and batch.cpu_lengths.device.type == "cpu"
        assert torch.equal(batch.cpu_lengths, batch.lengths.cpu())


# -- compile: the decision, without compiling ----------------------------------------------------------

CPU = COSTS["cpu"]


def test_auto_decision_is_a_pure_function_of_budget_and_cache():
    def auto(recur_steps: int, new: int = 1, cached: int = 0, **kw: Any) -> bool:
        return decide("auto", cells=1, recur_steps=recur_steps, new_shapes=new, cached_shapes=cached,
                      device_type=kw.get("device_type", "cpu"), available=kw.get("available", True)).compile

    pays_cold = math.ceil(MARGIN * CPU.cold_s / CPU.saving_s) + 1  # the first budget that repays a cold compile
    pays_warm = math.ceil(MARGIN * CPU.warm_s / CPU.saving_s) + 1
    assert auto(pays_cold) and not auto(pays_cold - 2)
    assert not auto(pays_warm) and auto(pays_warm, new=0, cached=1), "a warm cache makes a small budget pay"
    assert not auto(pays_cold - 2, new=1, cached=1), "each shape counts"
    assert not auto(10**9, available=False) and not auto(10**9, device_type="mps")
    assert decide("auto", cells=1, recur_steps=10**9, new_shapes=1, cached_shapes=0, device_type="cuda").compile
    # the default sweep's trials (fused anyway) and the default run's budget never compile cold on CPU
    assert not auto(256 * 30 * 4) and not auto(1256 * 50)
    fused = decide("auto", cells=0, recur_steps=10**9, new_shapes=0, cached_shapes=0, device_type="cpu")
    assert not fused.compile and "fused" in fused.reason
    assert decide("true", cells=1, recur_steps=1, new_shapes=1, cached_shapes=0, device_type="cpu").compile
    for mode in ("false", False, None):
        assert not decide(mode, cells=1, recur_steps=10**9, new_shapes=0, cached_shapes=1, device_type="cpu").compile


@pytest.mark.parametrize("value,expected", [("auto", "auto"), (True, "true"), (False, "false"), ("TRUE", "true")])
def test_compile_mode_accepts_yaml_booleans(value, expected):
    assert compiling.compile_mode(value) == expected


def test_bad_compile_and_amp_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.compile.*'sometimes'.*auto, false, true"):
        build_model(compose_config(["model.compile=sometimes"]), 2, 1)
    with pytest.raises(ConfigError, match=r"train.amp.*fp16.*bf16, false"):
        amp_dtype("fp16", torch.device("cpu"))
    assert amp_dtype(False, torch.device("cpu")) is None and amp_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private, empty compile cache."""
    monkeypatch.setenv("RNNSEARCH_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path


@pytest.fixture
def no_compiling(monkeypatch):
    """torch.compile fails the test if called."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))


def _budget_model(**model: Any):
    cfg = {"cell": {"name": "ln_lstm"}, "model": {"hidden_size": 8, "num_layers": 1, **model}}
    return build_model(cfg, 2, 1)


def test_prepare_counts_cached_shapes_and_installs_runners(cache, no_compiling, monkeypatch):
    monkeypatch.setattr(ln_lstm_kernel, "ENABLED", False)  # inductor's shapes (the kernel: test_ln_lstm_kernel.py)
    model = _budget_model(compile="auto")
    cell = compiling.step_cells(model)[0]
    args = dict(seq_len=20, batch_size=16, masked=False, device="cpu")
    steps = math.ceil(MARGIN * CPU.warm_s / CPU.saving_s / 20) + 1  # repays a warm compile, not a cold one
    cold = compiling.prepare(model, "auto", optimizer_steps=steps, **args)
    assert not cold.compile and "1 new, 0 cached" in cold.reason and "sequence_runner" not in cell.__dict__
    deferred = cell.batched_weights(20) is not None  # ln_lstm takes the batched weight gradient's slot route
    assert deferred
    compiling._mark_cached(compiling.cell_signature(cell, 16, torch.float32, None, "cpu", False, deferred=deferred))
    warm = compiling.prepare(model, "auto", optimizer_steps=steps, **args)
    assert warm.compile and "0 new, 1 cached" in warm.reason
    assert isinstance(cell.sequence_runner, ChunkRunner)
    assert str(cache) in str(compiling._marker("x")), "markers live in the shared cache"
    clone = copy.deepcopy(model)  # copies and pickles carry an uncompiled runner
    assert isinstance(compiling.step_cells(clone)[0].sequence_runner, ChunkRunner)
    pickle.loads(pickle.dumps(cell.sequence_runner))
    assert not compiling.prepare(model, "false", optimizer_steps=10**9, **args).compile
    assert "sequence_runner" not in cell.__dict__


@pytest.mark.parametrize("overrides", [["model.compile=false"], ["model.compile=auto"]], ids=["false", "auto-tiny"])
def test_compile_false_and_small_budgets_never_compile(overrides, cache, no_compiling):
    cfg = compose_config([*TINY, "cell=ln_lstm", "model.fused=never", *overrides])
    result = train(cfg)
    assert math.isfinite(result["train/loss"])


def test_a_failing_compiler_falls_back_to_the_eager_loop(monkeypatch, cache):
    def broken(*a: Any, **k: Any):
        def fn(*a: Any, **k: Any):
            raise RuntimeError("no compiler here")
        return fn

    monkeypatch.setattr(torch, "compile", broken)
    cells, fused = _pair({"name": "gru"}, 1, False)
    expected = fused(torch.ones(2, 9, IN, dtype=torch.float64))
    compiling.install(cells, chunk=4)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = cells(torch.ones(2, 9, IN, dtype=torch.float64))
    assert_close(out, expected, what="eager fallback")
    assert compiling.step_cells(cells)[0].sequence_runner.failed


def test_compiled_chunks_use_the_decomposed_tanh_unless_the_user_chose(monkeypatch, cache):
    seen: list[dict[str, Any]] = []

    def recording(fn: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return fn  # run eagerly: only the options are under test

    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.delenv(compiling.DECOMPOSE_TANH_ENV, raising=False)
    assert compiling.inductor_options() == {"cpp.use_decompose_tanh": True}
    cells, _ = _pair({"name": "lstm"}, 1, False)
    compiling.install(cells, chunk=4)
    cells(torch.ones(2, 9, IN, dtype=torch.float64))
    assert seen and seen[0]["options"] == {"cpp.use_decompose_tanh": True} and seen[0]["dynamic"] is False
    signature = compiling.step_cells(cells)[0].sequence_runner.signature
    monkeypatch.setenv(compiling.DECOMPOSE_TANH_ENV, "0")  # the user's own setting wins, and is another graph
    assert compiling.inductor_options() == {"cpp.use_decompose_tanh": False}
    cell = compiling.step_cells(cells)[0]
    assert compiling.cell_signature(cell, 2, torch.float64, None, "cpu", False, 4, True) != signature


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "dropout-wrapped"])
def test_a_compile_projection_cell_projects_each_chunk_inside_the_compiled_graph(monkeypatch, cache, wrapped):
    calls: list[tuple[int, bool]] = []
    routes: list[tuple[bool, bool]] = []

    def recording(fn: Any, **kwargs: Any) -> Any:
        def run(cell: Any, xc: Any, state: Any, vc: Any, deferred: bool, project: bool, sc: Any) -> Any:
            calls.append((xc.shape[-1], project))
            routes.append((deferred, sc is not None))
            return fn(cell, xc, state, vc, deferred, project, sc)
        return run  # eager: the arguments the graph would get are under test

    monkeypatch.setattr(torch, "compile", recording)
    cell = {"name": "ln_lstm"}
    model = {"hidden_size": H, "num_layers": 2, "fused": "never"}
    if wrapped:
        model["wrappers"] = [{"name": "dropout", "output_keep_prob": 1.0}]
    cells = build_model({"cell": cell, "model": model}, IN, OUT).double()
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64)
    out_e, gx_e, g_e = _outputs_and_grads(cells, x, LENGTHS)
    compiling.install(cells, chunk=4)
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, LENGTHS)
    assert all(project for _, project in calls)
    assert {c[0] for c in calls} == {compiling.step_cells(cells)[0].input_size, H}, "raw inputs, one width a layer"
    assert len(calls) == 4, "two full chunks per layer; the 9th step runs eagerly"
    # bare, the batched weight gradient's slot route keeps the projection in the graph; a wrapper takes the plain loop
    assert set(routes) == ({(False, False)} if wrapped else {(True, True)})
    assert_close(out_c, out_e, what="outputs")
    assert_close(gx_c, gx_e, what="input gradient")
    for name, grad in g_e.items():
        assert_close(g_c[name], grad, what=f"grad {name}")
    calls.clear()
    plain = build_model({"cell": {"name": "gru"}, "model": {**model, "num_layers": 1}}, IN, OUT).double()
    compiling.install(plain, chunk=4)
    _outputs_and_grads(plain, x, None)
    assert calls and all(not project and width == 3 * H for width, project in calls), "gru: projected before"
    if wrapped:  # a wrapper reads and sets its cell's switch
        outer = compiling.step_cells(cells)[0]
        outer.compile_projection = False
        assert outer.cell.compile_projection is False and outer.compile_projection is False


def test_amp_bf16_trains_on_cpu():
    result = train(compose_config([*TINY, "train.amp=bf16"]))
    assert math.isfinite(result["train/loss"]) and math.isfinite(result["test/mse"])


# -- compile: real compiles (slow) ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("cell,layers,bi,with_lengths", [({"name": "lstm"}, 1, False, False),
                                                         ({"name": "lstm"}, 1, True, True),
                                                         ({"name": "gru"}, 1, True, True)],
                         ids=["lstm", "lstm-bi-lengths", "gru-bi-lengths"])
def test_compiled_cell_path_gives_the_fused_outputs_and_gradients(cell, layers, bi, with_lengths, cache):
    cells, fused = _pair(cell, layers, bi)
    compiling.install(cells, chunk=4)  # 9 steps: two compiled chunks and one eager step
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64)
    lengths = LENGTHS if with_lengths else None
    out_f, gx_f, g_f = _outputs_and_grads(fused, x, lengths)
    for _ in range(2):  # the second call reuses the compiled graph
        out_c, gx_c, g_c = _outputs_and_grads(cells, x, lengths)
        assert_close(out_c, out_f, what="outputs")
        assert_close(gx_c, gx_f, what="input gradient")
        _assert_same_grads(cells, fused, g_c, g_f)
    runners = [c.sequence_runner for c in compiling.step_cells(cells)]
    assert all(r.compiled_calls == 4 and not r.failed for r in runners), [r.compiled_calls for r in runners]
    with torch.no_grad():  # evaluation runs the eager loop, with the same result
        assert_close(cells(x, lengths), out_f, what="no-grad outputs")
    small = _outputs_and_grads(cells, x[:3], None if lengths is None else lengths[:3])[0]  # another shape: eager
    assert_close(small, fused(x[:3], None if lengths is None else lengths[:3]), what="another batch size")
    assert all(r.compiled_calls == 4 for r in runners), "no second graph was compiled or used"
    assert all(compiling.is_cached(r.signature) for r in runners), "a warm-cache marker is written"


# -- CUDA (skipped without a GPU) ----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_cuda_cudnn_fused_path_matches_the_eager_cell_path(bi):
    assert torch.backends.cudnn.enabled and torch.backends.cudnn.is_available(), "the fused path runs on cuDNN"
    cells, fused = _pair({"name": "lstm"}, 2, bi)
    cells, fused = cells.cuda(), fused.cuda()
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64, device="cuda")
    for lengths_c, lengths_f in ((None, None), (LENGTHS.cuda(), LENGTHS)):  # fused packs with CPU lengths
        out_c, gx_c, g_c = _outputs_and_grads(cells, x, lengths_c)
        out_f, gx_f, g_f = _outputs_and_grads(fused, x, lengths_f)
        assert_close(out_c, out_f, what="outputs")
        assert_close(gx_c, gx_f, what="input gradient")
        _assert_same_grads(cells, fused, g_c, g_f)


TAGGING = ["task=tagging", "task.min_len=4"]  # variable lengths (packed on the fused path), within TINY's seq_len


def _sync_count(overrides: list[str]) -> int:
    """How many synchronizing CUDA calls one training run makes."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(compose_config([*TINY, "device=cuda", "train.batch_size=16", *overrides]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in record)


@cuda
@pytest.mark.parametrize("overrides", [TAGGING, ["model.fused=never", "cell=gru"], [*TAGGING, "train.amp=bf16"]],
                         ids=["fused-packed", "cells", "bf16"])
def test_cuda_training_steps_never_synchronize(overrides):
    """4x the steps, the same number of host-device syncs: none of them is per step."""
    few = _sync_count([*overrides, "task.train_size=32"])
    many = _sync_count([*overrides, "task.train_size=128"])
    assert many == few, f"{few} syncs with 2 steps, {many} with 8"


@cuda
@pytest.mark.parametrize("overrides", [[], ["model.fused=never"]], ids=["fused", "cells"])
def test_cuda_bf16_autocast_trains(overrides):
    result = train(compose_config([*TINY, "device=cuda", "train.amp=bf16", *overrides]))
    assert math.isfinite(result["train/loss"]) and math.isfinite(result["test/mse"])


@cuda
@pytest.mark.slow
def test_cuda_compiled_cell_path_gives_the_fused_outputs_and_gradients(cache):
    cells, fused = _pair({"name": "gru"}, 1, True)
    cells, fused = cells.cuda(), fused.cuda()
    compiling.install(cells, chunk=4)
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64, device="cuda")
    out_f, gx_f, g_f = _outputs_and_grads(fused, x, LENGTHS)
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, LENGTHS.cuda())
    assert_close(out_c, out_f, what="outputs")
    assert_close(gx_c, gx_f, what="input gradient")
    _assert_same_grads(cells, fused, g_c, g_f)
    assert all(c.sequence_runner.compiled_calls == 2 for c in compiling.step_cells(cells))


@pytest.mark.slow
def test_compiled_float32_lstm_matches_the_eager_loop(cache, monkeypatch):
    """float32, where the compiled chunk's exp-based tanh differs from torch.tanh by rounding only."""
    monkeypatch.setattr(ln_lstm_kernel, "ENABLED", False)  # inductor's graphs, not lstm's own CPU kernel
    torch.manual_seed(0)
    cells = build_model({"cell": {"name": "lstm"}, "model": {"hidden_size": H, "fused": "never"}}, IN, OUT)
    x = torch.randn(5, 8, IN) * 3  # pre-activations well into tanh's curved and saturated ranges
    out_e, gx_e, g_e = _outputs_and_grads(cells, x, None)
    compiling.install(cells, chunk=4)
    out_c, gx_c, g_c = _outputs_and_grads(cells, x, None)
    assert compiling.step_cells(cells)[0].sequence_runner.compiled_calls == 2
    assert_close(out_c, out_e, tol=2e-6, what="outputs")
    assert_close(gx_c, gx_e, tol=2e-6, what="input gradient")
    for name, grad in g_e.items():
        assert_close(g_c[name], grad, tol=2e-5, what=f"grad {name}")


@pytest.mark.slow
def test_compiled_ln_lstm_projecting_inside_its_graphs_matches_the_eager_loop(cache, monkeypatch):
    torch.manual_seed(0)
    model = {"hidden_size": H, "num_layers": 2, "bidirectional": True, "fused": "never"}
    cells = build_model({"cell": {"name": "ln_lstm"}, "model": model}, IN, OUT).double()
    x = torch.randn(len(LENGTHS), 9, IN, dtype=torch.float64)
    for cell in compiling.step_cells(cells):  # the reference: autograd's per-step recurrent weight gradient
        cell.batched_weight_grad = False
    out_e, gx_e, g_e = _outputs_and_grads(cells, x, LENGTHS)
    for cell in compiling.step_cells(cells):  # compiled: the batched gradient's slot route, inside the graphs
        cell.batched_weight_grad = True
    compiling.install(cells, chunk=4)
    real_stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *a, **k: real_stance("fail_on_recompile"))
    for _ in range(2):  # after a runner's first chunk, a recompile (that would run eagerly) fails the test
        out_c, gx_c, g_c = _outputs_and_grads(cells, x, LENGTHS)
        assert_close(out_c, out_e, what="outputs")
        assert_close(gx_c, gx_e, what="input gradient")
        for name, grad in g_e.items():
            assert_close(g_c[name], grad, what=f"grad {name}")
    runners = [c.sequence_runner for c in compiling.step_cells(cells)]
    assert all(r.compiled_calls == 4 and not r.failed for r in runners), [r.compiled_calls for r in runners]
    for r in runners:  # _call_key: (..., deferred, project, slot, ...)
        deferred, project, slot = r._key[4:7]
        assert deferred and project and slot is not None, "compiled graphs: deferred steps, raw inputs, a slot"
    assert len({r._fn for r in runners}) == 2, "one graph per input width: layer 1's, and layer 2's both directions"


@pytest.mark.slow
@pytest.mark.parametrize("cell,dtype", [("gru", torch.float32), ("lstm", torch.float64)])
def test_compiled_zoneout_in_training_draws_its_masks_before_using_them(cell, dtype, cache):
    """An in-place bernoulli_ on a fresh buffer ran after the compiled kernel that read it: NaN everywhere."""
    torch.manual_seed(0)
    model = {"hidden_size": H, "num_layers": 1, "fused": "never",
             "wrappers": [{"name": "zoneout", "h_prob": 0.5, "c_prob": 0.5}]}
    cells = build_model({"cell": {"name": cell}, "model": model}, IN, OUT).to(dtype)
    cells.per_step = True
    x = torch.randn(len(LENGTHS), 6, IN, dtype=dtype)
    compiling.install(cells, chunk=2)
    for _ in range(2):
        out, gx, grads = _outputs_and_grads(cells, x, None)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        assert all(torch.isfinite(g).all() for g in grads.values()), "gradients"
    runner = compiling.step_cells(cells)[0].sequence_runner
    assert runner.compiled_calls >= 6 and not runner.failed


@pytest.mark.slow
def test_training_with_compile_true_uses_the_compiled_loop(cache, monkeypatch):
    monkeypatch.setattr(ln_lstm_kernel, "ENABLED", False)  # inductor's graphs, not ln_lstm's own CPU kernel
    class Seen(Callback):
        def on_train_begin(self, info: dict[str, Any]) -> None:
            self.info = info

    seen = Seen()
    result = train(compose_config([*TINY, "cell=ln_lstm", "model.compile=true", "task.train_size=96",
                                   "train.batch_size=32", "train.epochs=2", f"task.seq_len={compiling.CHUNK}"]),
                   callbacks=[seen])
    assert math.isfinite(result["test/mse"]) and seen.info["compiled"] and seen.info["compile"] == "model.compile=true"
    runner = compiling.step_cells(seen.info["model"])[0].sequence_runner
    assert runner.compiled_calls == 6 and not runner.failed  # 6 steps x one chunk (seq_len = CHUNK)
    assert compiling.is_cached(runner.signature)


@pytest.mark.parametrize("overrides, expected", [
    (["cell=ln_lstm", "model.compile=false"], "cell-by-cell path, on cpu (eager: model.compile=false)"),
    # (no kernel cell: once this process has loaded the kernels, auto takes them for any budget)
    (["cell=lstm", "cell.activation=relu", "model.compile=auto"], "cell-by-cell path, on cpu (eager: budget of"),
    (["cell=lstm"], "fused torch.nn path, on cpu\n"),
])
def test_the_epoch_printer_says_which_path_runs_and_why(overrides, expected):
    import io

    from rnnsearch.callbacks import EpochPrinter

    stream = io.StringIO()
    train(compose_config([*TINY, *overrides]), callbacks=[EpochPrinter(stream=stream)])
    assert expected in stream.getvalue(), stream.getvalue()
