"""The eight LSTM variants of Greff et al. 2017 ("LSTM: A Search Space Odyssey"), as ``lstm`` options.

``variant`` selects one change to the standard LSTM (``vanilla``); Greff's
"vanilla" also has peepholes, so a faithful study sets ``use_peepholes: true``
for every variant except ``NP``:

========  =================================================================
NIG       no input gate: ``i = 1``
NFG       no forget gate: ``f = 1``
NOG       no output gate: ``o = 1``
NIAF      no input activation: ``g = x_g + h_g`` (no tanh)
NOAF      no output activation: ``h = o · c``
NP        no peepholes
CIFG      coupled input and forget gate: ``f = 1 − i``
FGR       full gate recurrence: each gate also sees all gates' previous
          activations, ``i += R_ii i' + R_fi f' + R_oi o'`` (and so for f, o);
          the previous ``[i, f, o]`` travels as a third state tensor
========  =================================================================

Gates a variant drops have no weights, so parameter counts are honest.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.functional import linear

from rnnsearch.errors import ConfigError, choice_error

VARIANTS = ("vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR")


def check_variant(variant: object, use_peepholes: bool) -> str:
    """Validate the variant name (and that NP is not combined with peepholes)."""
    if variant not in VARIANTS:
        raise choice_error("LSTM variant", variant, VARIANTS, "See Greff et al. 2017 or rnnsearch/cells/lstm_variants.py.")
    if variant == "NP" and use_peepholes:
        raise ConfigError("LSTM variant 'NP' means no peepholes, but use_peepholes=true; set one of them.")
    return str(variant)


def gate_names(variant: str) -> tuple[str, ...]:
    """The gate blocks a variant has, in weight row order (a subset of i, f, g, o)."""
    drop = {"NIG": "i", "NFG": "f", "CIFG": "f", "NOG": "o"}.get(variant)
    return tuple(g for g in "ifgo" if g != drop)


def variant_step(cell: "torch.nn.Module", xp_t: Tensor, state: tuple[Tensor, ...], weight_hh: Tensor,
                 bias_hh: Optional[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of ``cell`` (an LSTMCell with a non-vanilla ``variant``) with the given recurrent weight and bias."""
    h, c = state[0], state[1]
    variant = cell.variant
    pre = xp_t + linear(h, weight_hh, bias_hh)
    parts = dict(zip(cell.gates, pre.chunk(len(cell.gates), 1)))
    if variant == "FGR":
        ri, rf, ro = linear(state[2], cell.weight_gr).chunk(3, 1)
        parts["i"], parts["f"], parts["o"] = parts["i"] + ri, parts["f"] + rf, parts["o"] + ro
    if cell.use_peepholes:
        for g in ("i", "f"):
            if g in parts:
                parts[g] = parts[g] + getattr(cell, f"weight_c{g}") * c
    one = torch.ones_like(c)
    i = torch.sigmoid(parts["i"]) if "i" in parts else one
    if "f" in parts:
        f = torch.sigmoid(parts["f"] + cell.forget_bias)
    else:
        f = 1.0 - i if variant == "CIFG" else one
    g = parts["g"] if variant == "NIAF" else cell._act(parts["g"])
    c_new = f * c + i * g
    if cell.cell_clip is not None:
        c_new = c_new.clamp(-cell.cell_clip, cell.cell_clip)
    if "o" in parts:
        o_pre = parts["o"] + cell.weight_co * c_new if cell.use_peepholes else parts["o"]
        o = torch.sigmoid(o_pre)
    else:
        o = one
    m = o * (c_new if variant == "NOAF" else cell._act(c_new))
    if cell.num_proj is not None:
        m = linear(m, cell.weight_hr)
        if cell.proj_clip is not None:
            m = m.clamp(-cell.proj_clip, cell.proj_clip)
    new_state: tuple[Tensor, ...] = (m, c_new)
    if variant == "FGR":
        new_state += (torch.cat([i, f, o], 1),)
    return m, new_state
