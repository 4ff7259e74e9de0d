"""Layers over time: per-sequence reversal, bidirectional layers on padded variable-length
batches (each merge mode), and stacks. Reference: every sequence run alone, unpadded."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from rnnsearch import create_cell
from rnnsearch.layers import MERGE_MODES, BidirectionalLayer, CellStack, RecurrentLayer, last_step, reverse_padded

B, T, I, H = 4, 7, 3, 5
LENGTHS = torch.tensor([7, 4, 1, 5])


def test_reverse_padded_reverses_within_each_length():
    x = torch.arange(1, 6).repeat(3, 1).unsqueeze(-1)  # (3, 5, 1): 1..5 per row
    out = reverse_padded(x, torch.tensor([5, 3, 1]))[..., 0]
    assert out.tolist() == [[5, 4, 3, 2, 1], [3, 2, 1, 4, 5], [1, 2, 3, 4, 5]]
    assert reverse_padded(x, None)[..., 0].tolist()[0] == [5, 4, 3, 2, 1]
    twice = reverse_padded(reverse_padded(x, torch.tensor([5, 3, 1])), torch.tensor([5, 3, 1]))
    assert torch.equal(twice, x)


def test_last_step_picks_each_sequences_last_real_step():
    out = torch.arange(2 * 4).view(2, 4, 1).float()
    assert last_step(out, torch.tensor([4, 2]))[:, 0].tolist() == [3.0, 5.0]
    assert last_step(out, None)[:, 0].tolist() == [3.0, 7.0]


def _garbage(x: torch.Tensor, lengths: torch.Tensor, value: float | None = None) -> torch.Tensor:
    """``x`` with everything past each length replaced by garbage (huge values, or ``value``)."""
    y = x.clone()
    for b, n in enumerate(lengths.tolist()):
        y[b, n:] = torch.randn_like(y[b, n:]) * 1e4 if value is None else value
    return y


def _bidir(cell: str, merge_mode: str, **options) -> BidirectionalLayer:
    return BidirectionalLayer(create_cell(cell, I, H, **options).double(),
                              create_cell(cell, I, H, **options).double(), merge_mode)


def _merge_ref(a, b, mode):
    return {"concat": lambda: torch.cat([a, b], -1), "sum": lambda: a + b,
            "mul": lambda: a * b, "ave": lambda: (a + b) / 2}[mode]()


@pytest.mark.parametrize("merge_mode", MERGE_MODES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_variable_lengths_match_per_sequence_runs(cell, merge_mode):
    layer = _bidir(cell, merge_mode)
    x = torch.randn(B, T, I, dtype=torch.float64)
    out, last, (fin_f, fin_b) = layer(x, LENGTHS)
    width = 2 * layer.fw.output_size if merge_mode == "concat" else layer.fw.output_size
    assert out.shape == (B, T, width) and layer.output_size == width
    fw_cell, bw_cell = layer.fw.cell, layer.bw.cell
    for b, n in enumerate(LENGTHS.tolist()):
        seq = x[b : b + 1, :n]  # this sequence alone, no padding
        ref_f, st_f = fw_cell.forward_sequence(seq)
        ref_b, st_b = bw_cell.forward_sequence(seq.flip(1))  # starts at the sequence's own last step
        ref_b = ref_b.flip(1)  # aligned with the input in time
        assert_close(out[b, :n], _merge_ref(ref_f, ref_b, merge_mode)[0], what=f"row {b} outputs")
        assert not out[b, n:].any(), f"row {b}: outputs past the length must be zero"
        # last: forward's last real step, backward's output at time 0 (its final step)
        assert_close(last[b], _merge_ref(ref_f[0, -1], ref_b[0, 0], merge_mode), what=f"row {b} last")
        for got, want in zip(fin_f, st_f):
            assert_close(got[b], want[0], what=f"row {b} forward final state")
        for got, want in zip(fin_b, st_b):
            assert_close(got[b], want[0], what=f"row {b} backward final state")


@pytest.mark.parametrize("garbage", [None, float("nan"), float("inf")], ids=["huge", "nan", "inf"])
@pytest.mark.parametrize("merge_mode", MERGE_MODES)
def test_padding_content_never_leaks(merge_mode, garbage):
    layer = _bidir("lstm", merge_mode)
    x = torch.randn(B, T, I, dtype=torch.float64)
    out, last, finals = layer(x, LENGTHS)
    out2, last2, finals2 = layer(_garbage(x, LENGTHS, garbage), LENGTHS)
    assert torch.equal(out, out2)
    assert torch.equal(last, last2)
    for s1, s2 in zip(finals, finals2):
        assert all(torch.equal(a, b) for a, b in zip(s1, s2))


def test_reverse_layer_without_lengths_is_a_plain_flip():
    cell = create_cell("gru", I, H)
    x = torch.randn(B, T, I)
    out, last, fin = RecurrentLayer(cell, reverse=True)(x)
    ref, ref_fin = cell.forward_sequence(x.flip(1))
    assert torch.equal(out, ref.flip(1))
    assert torch.equal(last, ref[:, -1]) and torch.equal(fin[0], ref_fin[0])
    # full lengths are the same as no lengths
    out_l, _, _ = RecurrentLayer(cell, reverse=True)(x, torch.full((B,), T))
    assert_close(out_l, out, tol=1e-6)


def test_bidirectional_initial_states():
    layer = _bidir("lstm", "concat")
    x = torch.randn(B, T, I, dtype=torch.float64)
    s_f = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(2))
    s_b = tuple(torch.randn(B, H, dtype=torch.float64) for _ in range(2))
    out, _, _ = layer(x, LENGTHS, (s_f, s_b))
    b, n = 1, LENGTHS[1].item()
    ref_f, _ = layer.fw.cell.forward_sequence(x[b : b + 1, :n], tuple(s[b : b + 1] for s in s_f))
    ref_b, _ = layer.bw.cell.forward_sequence(x[b : b + 1, :n].flip(1), tuple(s[b : b + 1] for s in s_b))
    assert_close(out[b, :n], torch.cat([ref_f[0], ref_b[0].flip(0)], -1))


def test_cell_stack_runs_layers_in_order_with_lengths():
    l0 = BidirectionalLayer(create_cell("lstm", I, H), create_cell("lstm", I, H))
    l1 = RecurrentLayer(create_cell("gru", 2 * H, H))
    stack = CellStack([l0, l1])
    assert stack.output_size == H
    x = torch.randn(B, T, I)
    out, last, finals = stack(x, LENGTHS)
    mid, _, f0 = l0(x, LENGTHS)
    ref, ref_last, f1 = l1(mid, LENGTHS)
    assert torch.equal(out, ref) and torch.equal(last, ref_last)
    assert len(finals) == 2 and torch.equal(finals[1][0], f1[0])
    out2, _, _ = stack(_garbage(x, LENGTHS), LENGTHS)
    assert torch.equal(out, out2)
