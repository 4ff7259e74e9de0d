"""Greff et al. 2017's eight LSTM variants: each step checked against its formula written out here."""

from __future__ import annotations

import pytest
import torch

from rnnsearch import ConfigError, create_cell

H, I, B = 5, 3, 4
sig, tanh = torch.sigmoid, torch.tanh


def _blocks(cell, name):
    """Per-gate slices of a cell's stacked weights, keyed by gate letter."""
    t = getattr(cell, name)
    return dict(zip(cell.gates, t.chunk(len(cell.gates), 0)))


def reference_step(cell, x, h, c, prev=None):
    """The variant's step from Greff et al. (2017), eqs. in sec. 2, with peepholes as in their vanilla LSTM."""
    W, R, bi, bh = (_blocks(cell, n) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    z = {g: x @ W[g].T + bi[g] + h @ R[g].T + bh[g] for g in cell.gates}
    v = cell.variant
    if v == "FGR":
        Rg = cell.weight_gr
        for k, g in enumerate("ifo"):
            z[g] = z[g] + prev @ Rg[k * H:(k + 1) * H].T
    peep = cell.use_peepholes
    i = sig(z["i"] + (cell.weight_ci * c if peep else 0)) if "i" in z else torch.ones_like(c)
    if v == "CIFG":
        f = 1 - i
    elif v == "NFG":
        f = torch.ones_like(c)
    else:
        f = sig(z["f"] + cell.forget_bias + (cell.weight_cf * c if peep else 0))
    g = z["g"] if v == "NIAF" else tanh(z["g"])
    c_new = f * c + i * g
    o = sig(z["o"] + (cell.weight_co * c_new if peep else 0)) if "o" in z else torch.ones_like(c)
    h_new = o * (c_new if v == "NOAF" else tanh(c_new))
    return h_new, c_new, torch.cat([i, f, o], 1)


@pytest.mark.parametrize("variant", ["vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR"])
def test_variant_matches_formula_over_a_sequence(variant):
    torch.manual_seed(0)
    cell = create_cell("lstm", I, H, variant=variant, use_peepholes=variant != "NP", forget_bias=0.5).double()
    x = torch.randn(B, 6, I, dtype=torch.double)
    out, state = cell.forward_sequence(x)
    h = torch.zeros(B, H, dtype=torch.double)
    c = torch.zeros_like(h)
    prev = torch.zeros(B, 3 * H, dtype=torch.double)
    for t in range(x.shape[1]):
        h, c, prev = reference_step(cell, x[:, t], h, c, prev)
        torch.testing.assert_close(out[:, t], h, atol=1e-10, rtol=0)
    torch.testing.assert_close(state[1], c, atol=1e-10, rtol=0)
    if variant == "FGR":
        torch.testing.assert_close(state[2], prev, atol=1e-10, rtol=0)


def test_dropped_gates_have_no_weights():
    full = create_cell("lstm", I, H, use_peepholes=True)
    n_full = sum(p.numel() for p in full.parameters())
    for variant in ("NIG", "NFG", "NOG", "CIFG"):
        cell = create_cell("lstm", I, H, variant=variant, use_peepholes=True)
        gate = H * (I + H + 2) + H  # one gate's input/recurrent weights, two biases and its peephole
        assert sum(p.numel() for p in cell.parameters()) == n_full - gate, variant
    fgr = create_cell("lstm", I, H, variant="FGR")
    assert fgr.state_size == (H, H, 3 * H)


def test_cifg_forget_gate_is_one_minus_input_gate():
    torch.manual_seed(1)
    cell = create_cell("lstm", I, H, variant="CIFG").double()
    x = torch.randn(B, I, dtype=torch.double)
    c = torch.randn(B, H, dtype=torch.double)
    _, (h1, c1) = cell(x, (torch.zeros(B, H, dtype=torch.double), c))
    W = _blocks(cell, "weight_ih")
    i = sig(x @ W["i"].T + _blocks(cell, "bias_ih")["i"] + _blocks(cell, "bias_hh")["i"])
    g = tanh(x @ W["g"].T + _blocks(cell, "bias_ih")["g"] + _blocks(cell, "bias_hh")["g"])
    torch.testing.assert_close(c1, (1 - i) * c + i * g)


def test_bad_variant_and_np_with_peepholes_are_errors():
    with pytest.raises(ConfigError, match="'XYZ'.*CIFG"):
        create_cell("lstm", I, H, variant="XYZ")
    with pytest.raises(ConfigError, match="NP"):
        create_cell("lstm", I, H, variant="NP", use_peepholes=True)


def test_variants_are_never_fused():
    from rnnsearch import build_model

    m = build_model({"cell": {"name": "lstm", "variant": "CIFG"}, "model": {"hidden_size": 8}}, 2, 1)
    assert not m.fused
    with pytest.raises(ConfigError, match="variant"):
        build_model({"cell": {"name": "lstm", "variant": "NOG"}, "model": {"hidden_size": 8, "fused": "always"}}, 2, 1)
