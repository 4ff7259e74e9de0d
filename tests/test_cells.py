"""Cell parity: built-in cells against torch.nn cells/modules (copied weights) and against
the TF 1.x formulas (rnn_cell_impl.py), written out here with plain torch ops, to 1e-5."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from conftest import assert_close
from rnnsearch import ConfigError, create_cell, list_cells
from rnnsearch.cells import RNNCell
from rnnsearch.cells.gru import GRUCell

B, T, I, H, P = 3, 6, 4, 5, 3  # batch, steps, input, hidden, projection
sig = torch.sigmoid


def _inputs(steps: int = T) -> Tensor:
    return torch.randn(B, steps, I, dtype=torch.float64)


def _random_state(cell: RNNCell) -> tuple[Tensor, ...]:
    return tuple(torch.randn(B, n, dtype=torch.float64) for n in cell.state_size)


def _cell(name: str, **options) -> RNNCell:
    return create_cell(name, I, H, **options).double()


def _run_steps(cell: RNNCell, x: Tensor, state) -> tuple[Tensor, tuple[Tensor, ...]]:
    outs = []
    for t in range(x.shape[1]):
        out, state = cell(x[:, t], state)
        outs.append(out)
    return torch.stack(outs, 1), state


# ---------------------------------------------------------------------------------------------
# TF 1.x formulas, in TF's layout: one kernel over [x, h], TF's gate order.
# ---------------------------------------------------------------------------------------------

def tf_basic_rnn_step(x, h, kernel, bias, act):
    """BasicRNNCell: h' = act(W·[x, h] + b)."""
    h_new = act(torch.cat([x, h], 1) @ kernel + bias)
    return h_new, h_new


def tf_lstm_step(x, c, h, kernel, bias, forget_bias, w_i=None, w_f=None, w_o=None,
                 cell_clip=None, proj=None, proj_clip=None):
    """LSTMCell (BasicLSTMCell when no peepholes/clip/projection); gates i, j, f, o; state (c, m)."""
    i, j, f, o = (torch.cat([x, h], 1) @ kernel + bias).chunk(4, 1)
    if w_i is not None:
        c_new = sig(f + forget_bias + w_f * c) * c + sig(i + w_i * c) * torch.tanh(j)
    else:
        c_new = sig(f + forget_bias) * c + sig(i) * torch.tanh(j)
    if cell_clip is not None:
        c_new = torch.clamp(c_new, -cell_clip, cell_clip)
    if w_o is not None:
        m = sig(o + w_o * c_new) * torch.tanh(c_new)
    else:
        m = sig(o) * torch.tanh(c_new)
    if proj is not None:
        m = m @ proj
        if proj_clip is not None:
            m = torch.clamp(m, -proj_clip, proj_clip)
    return m, (c_new, m)


def tf_gru_step(x, h, gate_kernel, gate_bias, cand_kernel, cand_bias):
    """GRUCell: r, u = σ(W·[x, h]); c = tanh(W_c·[x, r·h]); h' = u·h + (1 − u)·c."""
    r, u = sig(torch.cat([x, h], 1) @ gate_kernel + gate_bias).chunk(2, 1)
    c = torch.tanh(torch.cat([x, r * h], 1) @ cand_kernel + cand_bias)
    h_new = u * h + (1 - u) * c
    return h_new, h_new


def tf_lstm_weights(cell) -> dict[str, Tensor]:
    """Our (i, f, g, o) weight_ih/weight_hh/bias_* as TF's kernel [I+H, 4H] in (i, j, f, o) order."""
    w = torch.cat([cell.weight_ih, cell.weight_hh], 1).detach()  # (4H, I+out)
    b = (cell.bias_ih + cell.bias_hh).detach()
    i, f, g, o = (torch.arange(4 * H).view(4, H))
    order = torch.cat([i, g, f, o])
    out = {"kernel": w[order].T, "bias": b[order]}
    if getattr(cell, "use_peepholes", False):
        out.update(w_i=cell.weight_ci.detach(), w_f=cell.weight_cf.detach(), w_o=cell.weight_co.detach())
    if getattr(cell, "num_proj", None):
        out["proj"] = cell.weight_hr.detach().T  # (H, P)
    return out


# ---------------------------------------------------------------------------------------------
# Against torch.nn
# ---------------------------------------------------------------------------------------------

TORCH_CELLS = [
    ("rnn", {"activation": "tanh"}, lambda: nn.RNNCell(I, H, nonlinearity="tanh")),
    ("rnn", {"activation": "relu"}, lambda: nn.RNNCell(I, H, nonlinearity="relu")),
    ("lstm", {"forget_bias": 0.0}, lambda: nn.LSTMCell(I, H)),
    ("gru", {"reset_after": True}, lambda: nn.GRUCell(I, H)),
]


@pytest.mark.parametrize("name,options,make", TORCH_CELLS, ids=["rnn-tanh", "rnn-relu", "lstm", "gru"])
def test_step_parity_with_torch_cell(name, options, make):
    cell = _cell(name, **options)
    ref = make().double()
    ref.load_state_dict(cell.state_dict())  # same names and shapes: the state_dict moves as is
    x = _inputs()
    state = _random_state(cell)
    out, new_state = _run_steps(cell, x, state)
    if name == "lstm":
        h, c = state
        for t in range(T):
            h, c = ref(x[:, t], (h, c))
            assert_close(out[:, t], h, what=f"{name} step {t}")
        assert_close(new_state[1], c, what="lstm c")
    else:
        h = state[0]
        for t in range(T):
            h = ref(x[:, t], h)
            assert_close(out[:, t], h, what=f"{name} step {t}")
    assert_close(new_state[0], out[:, -1], what="final h == last output")


def _copy_to_torch_layer(cell: RNNCell, mod: nn.RNNBase) -> None:
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
            if hasattr(cell, n):
                getattr(mod, f"{n}_l0").copy_(getattr(cell, n))


TORCH_LAYERS = [
    ("rnn", {"activation": "tanh"}, lambda: nn.RNN(I, H, nonlinearity="tanh", batch_first=True)),
    ("rnn", {"activation": "relu"}, lambda: nn.RNN(I, H, nonlinearity="relu", batch_first=True)),
    ("lstm", {"forget_bias": 0.0}, lambda: nn.LSTM(I, H, batch_first=True)),
    ("lstm", {"forget_bias": 0.0, "num_proj": P}, lambda: nn.LSTM(I, H, batch_first=True, proj_size=P)),
    ("gru", {}, lambda: nn.GRU(I, H, batch_first=True)),
]


@pytest.mark.parametrize("name,options,make", TORCH_LAYERS, ids=["rnn-tanh", "rnn-relu", "lstm", "lstm-proj", "gru"])
def test_sequence_parity_with_torch_module(name, options, make):
    """forward_sequence (input projection hoisted out of the loop) equals torch.nn.RNN/LSTM/GRU."""
    cell = _cell(name, **options)
    ref = make().double()
    _copy_to_torch_layer(cell, ref)
    x = _inputs()
    state = _random_state(cell)
    out, final = cell.forward_sequence(x, state)
    if name == "lstm":
        ref_out, (h_n, c_n) = ref(x, (state[0].unsqueeze(0), state[1].unsqueeze(0)))
        assert_close(final[1], c_n[0], what="c_n")
    else:
        ref_out, h_n = ref(x, state[0].unsqueeze(0))
    assert_close(out, ref_out, what=f"{name} outputs")
    assert_close(final[0], h_n[0], what="h_n")


def test_lstm_forget_bias_equals_torch_with_folded_bias():
    """TF's constant forget_bias = torch's LSTM with forget_bias added to the forget slice of the bias."""
    cell = _cell("lstm", forget_bias=1.5)
    ref = nn.LSTM(I, H, batch_first=True).double()
    _copy_to_torch_layer(cell, ref)
    with torch.no_grad():
        ref.bias_ih_l0[H:2 * H] += 1.5
    x = _inputs()
    out, (h, c) = cell.forward_sequence(x)
    ref_out, (h_n, c_n) = ref(x)
    assert_close(out, ref_out, what="outputs")
    assert_close(c, c_n[0], what="c")
    plain = _cell("lstm", forget_bias=0.0)
    plain.load_state_dict(cell.state_dict())
    assert (plain.forward_sequence(x)[0] - out).abs().max() > 1e-3, "forget_bias had no effect"


# ---------------------------------------------------------------------------------------------
# Against the TF formulas
# ---------------------------------------------------------------------------------------------

LSTM_OPTIONS = [
    {"forget_bias": 1.0},
    {"forget_bias": 0.0},
    {"forget_bias": -0.7},
    {"forget_bias": 1.0, "use_peepholes": True},
    {"forget_bias": 1.0, "cell_clip": 0.4},
    {"forget_bias": 1.0, "num_proj": P},
    {"forget_bias": 1.0, "num_proj": P, "proj_clip": 0.1},
    {"forget_bias": 0.5, "use_peepholes": True, "cell_clip": 0.4, "num_proj": P, "proj_clip": 0.1},
]


@pytest.mark.parametrize("options", LSTM_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_lstm_matches_tf_formula(options):
    cell = _cell("lstm", **options)
    with torch.no_grad():  # large weights so that the clips actually bite
        for p in cell.parameters():
            p.mul_(3.0)
    tf = tf_lstm_weights(cell)
    x = _inputs() * 2
    h0, c0 = _random_state(cell)
    c, m = c0, h0
    ref_outs, cs = [], []
    for t in range(T):
        m_out, (c, m) = tf_lstm_step(x[:, t], c, m, forget_bias=options["forget_bias"],
                                     cell_clip=options.get("cell_clip"), proj_clip=options.get("proj_clip"), **tf)
        ref_outs.append(m_out)
        cs.append(c)
    ref = torch.stack(ref_outs, 1)
    # the hoisted sequence path and the single-step path both match
    out_seq, (h_seq, c_seq) = cell.forward_sequence(x, (h0, c0))
    out_step, (h_step, c_step) = _run_steps(cell, x, (h0, c0))
    for out, h, c_fin, what in ((out_seq, h_seq, c_seq, "sequence"), (out_step, h_step, c_step, "step")):
        assert_close(out, ref, what=f"{what} outputs")
        assert_close(h, m, what=f"{what} final h")
        assert_close(c_fin, c, what=f"{what} final c")
    assert out_seq.shape[-1] == cell.output_size == (options.get("num_proj") or H)
    if "cell_clip" in options:  # the test exercised the clip
        assert (torch.stack(cs).abs() >= options["cell_clip"] - 1e-12).any()
    if "proj_clip" in options:
        assert (ref.abs() >= options["proj_clip"] - 1e-12).any()


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_rnn_matches_tf_formula(activation):
    cell = _cell("rnn", activation=activation)
    kernel = torch.cat([cell.weight_ih, cell.weight_hh], 1).detach().T
    bias = (cell.bias_ih + cell.bias_hh).detach()
    act = torch.tanh if activation == "tanh" else torch.relu
    x = _inputs()
    h = _random_state(cell)[0]
    out, (h_fin,) = cell.forward_sequence(x, (h,))
    for t in range(T):
        ref, h = tf_basic_rnn_step(x[:, t], h, kernel, bias, act)
        assert_close(out[:, t], ref, what=f"step {t}")
    assert_close(h_fin, h)


def test_gru_reset_before_matches_tf_formula():
    cell = _cell("gru", reset_after=False)
    w_ih, w_hh = cell.weight_ih.detach(), cell.weight_hh.detach()
    b = (cell.bias_ih + cell.bias_hh).detach()
    gate_kernel = torch.cat([w_ih[: 2 * H], w_hh[: 2 * H]], 1).T
    cand_kernel = torch.cat([w_ih[2 * H:], w_hh[2 * H:]], 1).T
    x = _inputs()
    h0 = _random_state(cell)[0]
    out, (h_fin,) = cell.forward_sequence(x, (h0,))
    out_step, _ = _run_steps(cell, x, (h0,))
    h = h0
    for t in range(T):
        ref, h = tf_gru_step(x[:, t], h, gate_kernel, b[: 2 * H], cand_kernel, b[2 * H:])
        assert_close(out[:, t], ref, what=f"step {t}")
        assert_close(out_step[:, t], ref, what=f"single step {t}")
    assert_close(h_fin, h)
    # the two reset modes are different functions of the same weights
    after = _cell("gru", reset_after=True)
    after.load_state_dict(cell.state_dict())
    assert (after.forward_sequence(x, (h0,))[0] - out).abs().max() > 1e-4


def _layer_norm(t: Tensor, eps: float) -> Tensor:
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps)


def test_ln_lstm_matches_written_out_formula():
    cell = _cell("ln_lstm", forget_bias=0.8)
    with torch.no_grad():  # non-trivial layer-norm gains and bias
        cell.ln_ih_weight.uniform_(0.5, 1.5)
        cell.ln_hh_weight.uniform_(0.5, 1.5)
        cell.ln_c_weight.uniform_(0.5, 1.5)
        cell.ln_c_bias.uniform_(-0.5, 0.5)
    x = _inputs()
    h, c = _random_state(cell)
    out, (h_fin, c_fin) = cell.forward_sequence(x, (h, c))
    eps = cell.eps

    def ln_gates(t: Tensor, gain: Tensor) -> Tensor:  # each gate block normalised on its own
        return torch.cat([_layer_norm(blk, eps) for blk in t.chunk(4, 1)], 1) * gain

    for t in range(T):
        gates = (ln_gates(x[:, t] @ cell.weight_ih.T, cell.ln_ih_weight)
                 + ln_gates(h @ cell.weight_hh.T, cell.ln_hh_weight) + cell.bias)
        i, f, g, o = gates.chunk(4, 1)
        c = sig(f + 0.8) * c + sig(i) * torch.tanh(g)
        h = sig(o) * torch.tanh(_layer_norm(c, eps) * cell.ln_c_weight + cell.ln_c_bias)
        assert_close(out[:, t], h, what=f"step {t}")
    assert_close(h_fin, h)
    assert_close(c_fin, c)


# ---------------------------------------------------------------------------------------------
# zero_state, sizes, options
# ---------------------------------------------------------------------------------------------

ZERO_STATE_CASES = [(n, {}) for n in ("rnn", "lstm", "gru", "ln_lstm")] + [("lstm", {"num_proj": P})]


@pytest.mark.parametrize("name,options", ZERO_STATE_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_zero_state(name, options):
    cell = create_cell(name, I, H, **options)
    expected = {"rnn": (H,), "gru": (H,), "ln_lstm": (H, H), "lstm": ((options.get("num_proj") or H), H)}[name]
    assert cell.state_size == expected
    state = cell.zero_state(B)
    assert isinstance(state, tuple) and [tuple(s.shape) for s in state] == [(B, n) for n in expected]
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" and not s.any() for s in state)
    assert all(s.dtype == torch.float64 for s in cell.zero_state(B, dtype=torch.float64))
    assert all(s.dtype == torch.float64 for s in cell.double().zero_state(B))  # follows the parameters
    # the default initial state of a sequence is zero_state
    x = _inputs()
    out_default, fin_default = cell.forward_sequence(x)
    out_zero, fin_zero = cell.forward_sequence(x, cell.zero_state(B))
    assert torch.equal(out_default, out_zero)
    assert all(torch.equal(a, b) for a, b in zip(fin_default, fin_zero))
    out, new_state = cell(x[:, 0], state=cell.zero_state(B))
    assert out.shape == (B, cell.output_size)


def test_forward_sequence_with_lengths_matches_truncated_runs():
    cell = _cell("lstm")
    x = _inputs()
    lengths = torch.tensor([T, 2, 4])
    out, (h, c) = cell.forward_sequence(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        ref, (rh, rc) = cell.forward_sequence(x[b : b + 1, :n])
        assert_close(out[b, :n], ref[0], what=f"row {b}")
        assert not out[b, n:].any(), "outputs past the length must be zero"
        assert_close(h[b], rh[0])
        assert_close(c[b], rc[0])


def test_list_cells():
    names = list_cells()
    assert {"rnn", "lstm", "gru", "ln_lstm"} <= set(names)
    assert names == sorted(names)
    assert list_cells("*lstm") == ["ln_lstm", "lstm"]


BAD_CELLS = [
    ("nope", I, H, {}, ["'nope'", "gru", "lstm", "rnn"]),
    ("lstm", I, H, {"bogus": 1}, ["'bogus'", "forget_bias", "use_peepholes", "num_proj"]),
    ("lstm", I, H, {"forget_bias": math.nan}, ["forget_bias", "nan"]),
    ("lstm", I, H, {"forget_bias": math.inf}, ["forget_bias", "inf"]),
    ("ln_lstm", I, H, {"forget_bias": -math.inf}, ["forget_bias", "-inf"]),
    ("lstm", I, H, {"forget_bias": "abc"}, ["forget_bias", "'abc'"]),
    ("lstm", I, H, {"cell_clip": -1.0}, ["cell_clip", "-1.0"]),
    ("lstm", I, H, {"proj_clip": 1.0}, ["proj_clip", "num_proj"]),
    ("lstm", I, H, {"num_proj": 0}, ["num_proj", "0"]),
    ("lstm", I, H, {"activation": "nope"}, ["'nope'", "tanh", "relu", "sigmoid"]),
    ("rnn", I, H, {"activation": "sigmoid"}, ["'sigmoid'", "relu, tanh"]),
    ("gru", I, H, {"reset": True}, ["'reset'", "reset_after"]),
    ("lstm", 0, H, {}, ["input_size", "0"]),
    ("gru", I, -2, {}, ["hidden_size", "-2"]),
    ("rnn", I, 2.5, {}, ["hidden_size", "2.5"]),
]


@pytest.mark.parametrize("name,i,h,options,words", BAD_CELLS, ids=lambda v: None)
def test_bad_cell_options_name_value_and_choices(name, i, h, options, words):
    with pytest.raises(ConfigError) as err:
        create_cell(name, i, h, **options)
    msg = str(err.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("fused", ["never", "always"])
def test_gru_gate_bias_starts_the_gates_bias_as_tf_grucell(fused):
    # TF 1.x GRUCell starts its gate bias at 1.0 and its candidate's at 0 (REFERENCE.md); PyTorch's init is uniform
    from rnnsearch import build_model

    H = 4
    model = build_model({"cell": {"name": "gru", "gate_bias": 1.0},
                         "model": {"hidden_size": H, "num_layers": 2, "bidirectional": True, "fused": fused}}, 3, 1)
    pairs = [(m.bias_ih, m.bias_hh) for m in model.modules() if isinstance(m, GRUCell)] if fused == "never" else \
        [(p, getattr(m, n.replace("bias_ih", "bias_hh"))) for m in model.modules() if isinstance(m, torch.nn.GRU)
         for n, p in m.named_parameters() if n.startswith("bias_ih")]
    assert len(pairs) == 4  # 2 layers x 2 directions
    for b_ih, b_hh in pairs:
        assert torch.equal(b_ih[: 2 * H], torch.ones(2 * H)) and torch.equal(b_ih[2 * H:], torch.zeros(H))
        assert torch.equal(b_hh, torch.zeros(3 * H))
    default = create_cell("gru", 3, H)
    assert default.bias_ih.abs().max() <= 0.5 and default.bias_ih.std() > 0  # PyTorch's U(-1/2, 1/2) otherwise
    with pytest.raises(ConfigError, match="gate_bias must be a finite number"):
        create_cell("gru", 3, H, gate_bias="one")
