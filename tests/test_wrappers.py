"""Wrapper semantics: dropout (variational or per step, never on an LSTM's c, identity at eval),
residual, device and zoneout, plus wrapper option checking."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from conftest import assert_close
from rnnsearch import ConfigError, build_model, create_cell, create_wrapper, list_wrappers
from rnnsearch.cells import RNNCell
from rnnsearch.cells.wrappers import DeviceWrapper, DropoutWrapper, ResidualWrapper, ZoneoutWrapper

B, T, H = 8, 6, 16
KEEP = 0.5


class EchoCell(RNNCell):
    """Outputs its input; its state becomes all ones. Makes input/output masks visible."""

    def forward(self, x_t: Tensor, state):
        return x_t, (torch.ones_like(state[0]),)


class StateEchoCell(RNNCell):
    """Outputs the state it was given; its new state is all ones. Makes state masks visible."""

    def forward(self, x_t: Tensor, state):
        return state[0], (torch.ones_like(state[0]),)


def _ones() -> Tensor:
    return torch.ones(B, T, H)


def _is_mask(t: Tensor, keep: float) -> bool:
    """Every entry is 0 or 1/keep, and both occur."""
    zero, scaled = t == 0, torch.isclose(t, torch.tensor(1.0 / keep))
    return bool((zero | scaled).all() and zero.any() and scaled.any())


# (cell class, wrapper option, which outputs carry the mask)
MASK_CASES = [
    (EchoCell, "input_keep_prob", slice(0, T)),
    (EchoCell, "output_keep_prob", slice(0, T)),
    (StateEchoCell, "state_keep_prob", slice(1, T)),  # output t is the (dropped) state of step t - 1
]


@pytest.mark.parametrize("cell_cls,option,steps", MASK_CASES, ids=["input", "output", "state"])
def test_variational_mask_is_constant_over_time_and_new_per_sequence(cell_cls, option, steps):
    w = create_wrapper("dropout", cell_cls(H, H), **{option: KEEP}, variational_recurrent=True).train()
    out = w.forward_sequence(_ones())[0][:, steps]  # (b, t', h)
    assert _is_mask(out, KEEP)
    assert torch.equal(out, out[:, :1].expand_as(out)), "variational mask changed between steps"
    assert not torch.equal(out[0, 0], out[1, 0]), "every sequence of the batch should get its own mask"
    again = w.forward_sequence(_ones())[0][:, steps]
    assert not torch.equal(out, again), "a new sequence (batch) must draw a new mask"


@pytest.mark.parametrize("cell_cls,option,steps", MASK_CASES, ids=["input", "output", "state"])
def test_non_variational_mask_changes_every_step(cell_cls, option, steps):
    w = create_wrapper("dropout", cell_cls(H, H), **{option: KEEP}).train()
    out = w.forward_sequence(_ones())[0][:, steps]
    assert _is_mask(out, KEEP)
    assert not torch.equal(out[:, 0], out[:, 1]), "per-step dropout reused a mask"


@pytest.mark.parametrize("variational", [False, True])
def test_dropout_is_identity_in_eval_mode(variational):
    cell = create_cell("lstm", H, H)
    w = create_wrapper("dropout", cell, input_keep_prob=0.3, output_keep_prob=0.4, state_keep_prob=0.5,
                       variational_recurrent=variational)
    x = torch.randn(B, T, H)
    w.eval()
    out, (h, c) = w.forward_sequence(x)
    ref, (rh, rc) = cell.forward_sequence(x)
    assert torch.equal(out, ref) and torch.equal(h, rh) and torch.equal(c, rc)
    w.train()
    assert not torch.equal(w.forward_sequence(x)[0], ref)  # and it does drop in training mode


@pytest.mark.parametrize("variational", [False, True])
def test_state_dropout_never_touches_lstm_c(variational):
    cell = create_cell("lstm", H, H)
    w = create_wrapper("dropout", cell, state_keep_prob=KEEP, variational_recurrent=variational).train()
    x = torch.randn(B, H)
    state = (torch.randn(B, H), torch.randn(B, H))
    out, (h, c) = w(x, state)
    ref_out, (ref_h, ref_c) = cell(x, state)
    assert torch.equal(c, ref_c), "the LSTM cell state c must never be dropped"
    assert torch.equal(out, ref_out), "state dropout must not change the output"
    assert _is_mask(h / ref_h, KEEP), "h is the dropped state"


def test_dropout_scales_by_inverse_keep_prob():
    w = create_wrapper("dropout", EchoCell(H, H), output_keep_prob=0.25).train()
    out = w.forward_sequence(torch.ones(64, T, H))[0]
    assert _is_mask(out, 0.25)
    assert abs(out.mean().item() - 1.0) < 0.1  # inverted dropout keeps the expectation


def test_residual_adds_the_input():
    cell = create_cell("gru", H, H)
    w = create_wrapper("residual", cell)
    x = torch.randn(B, T, H)
    state = cell.zero_state(B)
    out, (h,) = w.forward_sequence(x, state)
    ref, (ref_h,) = cell.forward_sequence(x, state)
    assert_close(out, x + ref, tol=1e-6)
    assert torch.equal(h, ref_h), "the state is the cell's own"
    step_out, _ = w(x[:, 0], state)
    assert_close(step_out, x[:, 0] + ref[:, 0], tol=1e-6)


def test_residual_size_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"input has 3 features and its output 5"):
        create_wrapper("residual", create_cell("lstm", 3, 5))
    with pytest.raises(ConfigError, match=r"input has 5 features and its output 2"):
        create_wrapper("residual", create_cell("lstm", 5, 5, num_proj=2))


def test_residual_in_a_model_with_mismatched_widths_is_a_config_error():
    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 4, "num_layers": 2, "bidirectional": True,
                                               "wrappers": [{"name": "residual"}]}}
    with pytest.raises(ConfigError, match="residual"):
        build_model(cfg, input_size=2, output_size=1)
    cfg["model"]["merge_mode"] = "sum"  # each layer's output is then hidden_size wide again
    assert build_model(cfg, input_size=2, output_size=1)(torch.randn(2, 3, 2)).shape == (2, 1)


def test_wrappers_compose_in_config_order():
    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 4, "embedding_size": 4, "wrappers": [
        {"name": "dropout", "output_keep_prob": 0.9}, {"name": "residual"}, {"name": "zoneout"}]}}
    cell = build_model(cfg, input_size=2, output_size=1).stack.layers[0].cell
    assert isinstance(cell, ZoneoutWrapper)
    assert isinstance(cell.cell, ResidualWrapper)
    assert isinstance(cell.cell.cell, DropoutWrapper)
    assert cell.cell.cell.cell.registry_name == "lstm"


def test_device_wrapper_on_cpu():
    cell = create_cell("lstm", 3, H)
    w = create_wrapper("device", cell, device="cpu")
    assert w.device == torch.device("cpu")
    assert all(s.device.type == "cpu" for s in w.zero_state(B, device="meta"))  # its own device wins
    x = torch.randn(B, T, 3)
    out, _ = w.forward_sequence(x)
    assert torch.equal(out, cell.forward_sequence(x)[0])


def test_model_to_keeps_device_wrapped_cell_pinned():
    """model.to(other device) moves everything but the device-wrapped cell ("meta" stands in for a GPU)."""
    cfg = {"cell": {"name": "gru"}, "model": {"hidden_size": 4, "wrappers": [{"name": "device", "device": "cpu"}]}}
    model = build_model(cfg, input_size=2, output_size=1)
    model.to("meta")
    wrapper = model.stack.layers[0].cell
    assert isinstance(wrapper, DeviceWrapper)
    assert all(p.device.type == "cpu" for p in wrapper.parameters())
    assert all(p.device.type == "meta" for p in model.head.parameters())
    model.double()  # dtype changes still apply to the pinned cell
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in wrapper.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_wrapper_runs_a_cpu_layer_inside_a_cuda_model():
    cfg = {"cell": {"name": "lstm"}, "model": {"hidden_size": 8, "num_layers": 3, "fused": "never",
                                               "layers": {1: {"wrappers": [{"name": "device", "device": "cpu"}]}}}}
    torch.manual_seed(0)
    model = build_model(cfg, input_size=2, output_size=1)
    x, lengths = torch.randn(4, 5, 2), torch.tensor([5, 3, 2, 1])
    ref = model(x, lengths)
    model.cuda()
    assert next(model.stack.layers[1].cell.parameters()).device.type == "cpu"
    assert next(model.stack.layers[2].cell.parameters()).device.type == "cuda"
    out = model(x.cuda(), lengths.cuda())
    assert out.device.type == "cuda"
    assert_close(out.cpu(), ref, tol=1e-5)


@pytest.mark.parametrize("device,words", [("nonsense", ["'nonsense'", "cpu", "cuda"]),
                                          ("cuda:99", ["'cuda:99'", "not available"])])
def test_device_wrapper_bad_device(device, words):
    with pytest.raises(ConfigError) as err:
        create_wrapper("device", create_cell("rnn", 2, 2), device=device)
    assert all(w in str(err.value) for w in words), str(err.value)


def _zoneout_step(training: bool, h_prob: float, c_prob: float):
    cell = create_cell("lstm", H, H).double()
    w = ZoneoutWrapper(cell, h_prob=h_prob, c_prob=c_prob).train(training)
    x = torch.randn(B, H, dtype=torch.float64)
    old = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
    out, zoned = w(x, old)
    _, new = cell(x, old)
    return out, zoned, old, new


def test_zoneout_training_keeps_each_unit_old_or_new():
    out, (h, c), (h_old, c_old), (h_new, c_new) = _zoneout_step(True, h_prob=0.3, c_prob=0.6)
    for z, o, n, p in ((h, h_old, h_new, 0.3), (c, c_old, c_new, 0.6)):
        kept_old, took_new = z == o, z == n
        assert (kept_old | took_new).all(), "each unit is either its previous or its new value"
        assert kept_old.any() and took_new.any()
        assert abs(kept_old.double().mean().item() - p) < 0.2  # B*H = 128 draws
    assert torch.equal(out, h), "the output is the zoned h"


def test_zoneout_eval_is_the_expectation():
    out, (h, c), (h_old, c_old), (h_new, c_new) = _zoneout_step(False, h_prob=0.3, c_prob=0.6)
    assert_close(h, 0.3 * h_old + 0.7 * h_new, tol=1e-12)
    assert_close(c, 0.6 * c_old + 0.4 * c_new, tol=1e-12)
    assert torch.equal(out, h)
    # deterministic at eval
    out2, _, _, _ = _zoneout_step(False, h_prob=0.3, c_prob=0.6)
    assert out2.shape == out.shape


@pytest.mark.parametrize("dropout", [{"output_keep_prob": 0.5}, {"state_keep_prob": 0.5},
                                     {"output_keep_prob": 0.5, "variational_recurrent": True}])
def test_zoneout_around_output_or_state_dropout_zones_the_state_only_in_train_and_eval(dropout):
    # [dropout, zoneout]: the output is the dropout wrapper's own, not the zoned h, in both modes (it was zoned
    # in eval only, where dropout returns h itself: eval then was not the expectation of training)
    torch.manual_seed(0)
    cell = create_cell("gru", H, H).double()
    w = ZoneoutWrapper(DropoutWrapper(cell, **dropout), h_prob=0.5, c_prob=0.5)
    assert w.output_is_state is False
    x = torch.randn(B, H, dtype=torch.float64)
    old = (torch.randn(B, H, dtype=torch.float64),)
    _, (h_new,) = cell(x, old)
    out, (h,) = w.eval()(x, old)
    assert torch.equal(out, h_new), "eval: the wrapped cell's output, unzoned"
    assert_close(h, 0.5 * old[0] + 0.5 * h_new, tol=1e-12)
    w.train()
    w.start_sequence(B, x.device, x.dtype)
    out, (h,) = w(x, old)
    scale = 2.0 if "output_keep_prob" in dropout else 1.0
    assert ((out == 0) | torch.isclose(out, scale * h_new)).all(), "training: dropped h_new, not the zoned h"


def test_zoneout_around_input_dropout_or_device_still_zones_the_output():
    cell = create_cell("lstm", H, H).double()
    for inner in (DropoutWrapper(cell, input_keep_prob=0.5), DeviceWrapper(cell, "cpu")):
        w = ZoneoutWrapper(inner, h_prob=0.3, c_prob=0.6).eval()
        assert w.output_is_state is None  # as the plain cell's: decided by the step's tensors
        old = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))
        out, (h, _) = w(torch.randn(B, H, dtype=torch.float64), old)
        assert torch.equal(out, h)
    assert ZoneoutWrapper(ResidualWrapper(cell)).output_is_state is False


def test_zoneout_zero_probability_is_the_bare_cell():
    out, (h, c), _, (h_new, c_new) = _zoneout_step(True, h_prob=0.0, c_prob=0.0)
    assert torch.equal(h, h_new) and torch.equal(c, c_new) and torch.equal(out, h_new)


def test_list_wrappers():
    assert {"dropout", "residual", "device", "zoneout"} <= set(list_wrappers())


BAD_WRAPPERS = [
    ("nope", {}, ["'nope'", "dropout", "residual", "device", "zoneout"]),
    ("dropout", {"keep_prob": 0.5}, ["'keep_prob'", "input_keep_prob", "output_keep_prob", "state_keep_prob"]),
    ("dropout", {"output_keep_prob": 0.0}, ["output_keep_prob", "(0, 1]", "0.0"]),
    ("dropout", {"input_keep_prob": 1.5}, ["input_keep_prob", "(0, 1]", "1.5"]),
    ("dropout", {"state_keep_prob": -0.1}, ["state_keep_prob", "(0, 1]", "-0.1"]),
    ("dropout", {"output_keep_prob": math.nan}, ["output_keep_prob", "nan"]),
    ("dropout", {"output_keep_prob": "high"}, ["output_keep_prob", "'high'"]),
    ("residual", {"scale": 2}, ["'scale'", "(none)"]),
    ("zoneout", {"h_prob": 1.0}, ["h_prob", "[0, 1)", "1.0"]),
    ("zoneout", {"c_prob": -0.5}, ["c_prob", "-0.5"]),
]


@pytest.mark.parametrize("name,options,words", BAD_WRAPPERS, ids=lambda v: None)
def test_bad_wrapper_options(name, options, words):
    with pytest.raises(ConfigError) as err:
        create_wrapper(name, create_cell("gru", 4, 4), **options)
    assert all(w in str(err.value) for w in words), str(err.value)
