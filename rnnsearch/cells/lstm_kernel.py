"""``lstm``'s fused CPU kernel: run a training sequence of the registry's LSTM through ``csrc/lstm.h``.

One job. ``csrc/lstm.h`` is a hand-written forward and backward pass of a whole
:class:`~rnnsearch.cells.lstm.LSTMCell` sequence (float32, CPU), input projection included, in the scheme of
``ln_lstm``'s kernel with the input inside: one GEMM per step, ``[x_t, h_{t-1}] [W_ih W_hh]^T`` (on an
AVX-512 build through the kernels' own micro-kernel, each thread taking its own batch rows through the whole
sequence; else BLAS, split by columns over the threads), everything between two GEMMs one vectorised pass per
batch row (the bias added there), the bias' and peepholes' gradients accumulated per thread, the input's gradient
one more GEMM of each backward step, both weights' gradients one GEMM after the loop over the saved rows
``[x_t, h_{t-1}]``. It is part of the same extension (one
build per machine, built and loaded by :mod:`rnnsearch.cells.ln_lstm_kernel`), and replaces inductor's
compiled chunks for the cell on the CPU.

It runs where the compiled path is (``model.compile`` true, or ``auto`` when it pays), for a
grad-enabled float32 CPU sequence without autocast of the registry's own ``lstm`` (a subclass that
redefines a step method gets the generic path) in any variant (vanilla, NP and Greff et al.'s seven
others, each its own instantiation of the kernel; FGR's gate state is a third state tensor), with ``tanh``,
without projection
(``num_proj``; peepholes, ``cell_clip`` and any ``forget_bias`` are in), with
``batched_weight_grad`` on and ``weight_hh`` trained. Anything else, a failed build, or
``ln_lstm_kernel.ENABLED = False`` (the switch for both kernels) runs the generic path.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ln_lstm_kernel
from .base import _owner
from .ln_lstm_kernel import Workspace

#: The step methods the kernel reproduces: a subclass redefining any of them runs the generic path.
STEP_METHODS = ("project_input", "recur", "recur_deferred", "_step", "forward_sequence", "zero_state",
                "start_sequence")

#: The variants, by the number csrc/lstm.h knows them by (NP is vanilla without peepholes).
VARIANTS = {"vanilla": 0, "NP": 0, "NIG": 1, "NFG": 2, "NOG": 3, "NIAF": 4, "NOAF": 5, "CIFG": 6, "FGR": 7}

WORKSPACE = Workspace()  # its own: a model with ln_lstm and lstm layers keeps both kernels' buffers


def _saved_shapes(batch: int, steps: int, inputs: int, hidden: int, fgr: bool, zoned: bool) -> list[tuple[int, ...]]:
    T, B, H = steps, batch, hidden
    # [x_t, h_{t-1}]; c_{t-1} and c_T; the gates; tanh(c); FGR: the gate state s_{t-1} and s_T (else none);
    # zoneout: the cell before zoning (else none)
    return [(T, B, inputs + H), (T + 1, B, H), (T, B, 4 * H), (T, B, H), (T + 1, B, 3 * H) if fgr else (0,),
            (T, B, H) if zoned else (0,)]


class LSTMSequence(torch.autograd.Function):
    """A whole ``lstm`` sequence, input projection included: forward and backward in the C++ kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_ih: Tensor, h0: Tensor, c0: Tensor, s0: Tensor, W_hh: Tensor, bias: Tensor,
                W_gr: Tensor, w_ci: Tensor, w_cf: Tensor, w_co: Tensor, valid: Tensor, Zh: Tensor, Zc: Tensor,
                Mh: Tensor, forget_bias: float, cell_clip: float, variant: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ext = ln_lstm_kernel.load()
        B, T, I = x.shape
        H = h0.shape[1]
        shapes = _saved_shapes(B, T, I, H, W_gr.numel() > 0, Zh.numel() > 0)
        saved = WORKSPACE.take(shapes, x)  # XH, Cprev, Acts, Tc, S, Cnew (the last two empty where not used)
        XH = saved[0]  # time-major rows [x_t, h_{t-1}]: the kernel writes the h part
        XH[:, :, :I].copy_(x.transpose(0, 1))
        W_ih, W_hh, bias, W_gr, w_ci, w_cf, w_co = (t.contiguous() for t in (W_ih, W_hh, bias, W_gr, w_ci, w_cf, w_co))
        # the input enters each step's one GEMM, [x_t, h_{t-1}] [W_ih W_hh]^T, and the bias the kernel's pass after it
        out, hT, cT, sT = ext.lstm_forward(h0.contiguous(), c0.contiguous(), torch.cat([W_ih, W_hh], 1), bias, w_ci,
                                           w_cf, w_co, valid, float(forget_bias), float(cell_clip), int(variant),
                                           s0.contiguous(), W_gr, *saved[:5], Zh, Zc, saved[5], Mh)
        ctx.save_for_backward(W_ih, W_hh, W_gr, w_ci, w_cf, w_co, valid, Zh, Zc, Mh, *saved)
        ctx.cell_clip, ctx.variant = float(cell_clip), int(variant)
        WORKSPACE.give_when_freed(ctx, saved)
        return out, hT, cT, sT

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, dhT: Tensor, dcT: Tensor, dsT: Tensor) -> tuple[Optional[Tensor], ...]:
        W_ih, W_hh, W_gr, w_ci, w_cf, w_co, valid, Zh, Zc, Mh, *saved = ctx.saved_tensors
        T, B, I = saved[0].shape[0], saved[0].shape[1], W_ih.shape[1]
        H = W_hh.shape[1]
        fgr = W_gr.numel() > 0
        # FGR's work buffer: back right after
        work = WORKSPACE.take([(T, B, 3 * H)], W_hh, fresh_drops_others=False) if fgr else [W_hh.new_empty(0)]
        ext = ln_lstm_kernel.load()
        # the input's gradient (time-major; a GEMM of each backward step's) only where it needs one
        dx, dh0, dc0, dW, dbias, dci, dcf, dco, ds0, dWgr = ext.lstm_backward(
            dout, dhT, dcT, W_hh, w_ci, w_cf, w_co, ctx.cell_clip, ctx.variant, dsT, W_gr, *saved[:5], Zh, Zc,
            saved[5], Mh, valid, work[0], W_ih, ctx.needs_input_grad[0])
        if fgr:
            WORKSPACE.give(work)
        # the input's gradient batch-first again; dW holds [W_ih W_hh]'s (one GEMM over [x_t, h_{t-1}])
        dx = dx.transpose(0, 1) if ctx.needs_input_grad[0] else None
        peep = tuple(g if w.numel() else None for g, w in ((dci, w_ci), (dcf, w_cf), (dco, w_co)))
        return (dx, dW[:, :I], dh0, dc0, ds0 if fgr else None, dW[:, I:], dbias, dWgr if fgr else None, *peep,
                None, None, None, None, None, None, None)


def _unchanged(cell: Any) -> bool:
    from .lstm import LSTMCell

    return all(_owner(type(cell), m) is _owner(LSTMCell, m) for m in STEP_METHODS)


def applies(cell: Any, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
    """Whether training sequences of ``steps`` steps of ``cell`` would run the kernel (before building it)."""
    from .lstm import LSTMCell

    return (ln_lstm_kernel.ENABLED and isinstance(cell, LSTMCell) and _unchanged(cell)
            and all(isinstance(v, (int, float)) for v in (cell.forget_bias, cell.cell_clip or 0.0))  # not tensors
            and cell.variant in VARIANTS and cell.activation == "tanh" and cell.num_proj is None
            and cell.batched_weight_grad and cell.weight_hh.requires_grad and steps >= 2 and device_type == "cpu"
            and dtype == torch.float32 and amp is None and ln_lstm_kernel._failed is None)


def forward_sequence(cell: Any, x: Tensor, state: Optional[tuple[Tensor, ...]], lengths: Optional[Tensor],
                     zoneout: Optional[tuple[float, float, bool]] = None, state_dropout: Optional[Tensor] = None
                     ) -> Optional[tuple[Tensor, tuple[Tensor, ...]]]:
    """``cell.forward_sequence`` through the kernel, or None where it does not apply (the caller runs the generic path).

    ``zoneout``: ``(h_prob, c_prob, training)`` of a :class:`~rnnsearch.cells.wrappers.ZoneoutWrapper` around the
    cell (not FGR), whose sequence this then is: each unit's draw keeps its previous state in training (one
    draw per unit and step, as the wrapper's step loop draws them: :func:`.ln_lstm_kernel.zoneout_draws`), the
    probability mixes it in eval. ``state_dropout``: ``(T, B, H)`` multipliers (0 or 1 / keep) of the ``h`` passed
    on as state, from a :class:`~rnnsearch.cells.wrappers.DropoutWrapper`'s ``state_keep_prob`` (the output is the
    ``h`` before them).
    """
    inputs = ln_lstm_kernel.sequence_inputs(cell, x, state, lengths, applies)
    if inputs is None or (zoneout is not None and (cell.variant == "FGR" or state_dropout is not None)):
        return None
    state, valid = inputs
    none = x.new_empty(0)
    zh, zc = ln_lstm_kernel.zoneout_masks((x.shape[1], x.shape[0], cell.hidden_size), zoneout, none)
    peep = [getattr(cell, f"weight_c{g}", none) if cell.use_peepholes else none for g in "ifo"]
    fgr = cell.variant == "FGR"
    mh = none if state_dropout is None else state_dropout.contiguous()
    out, hT, cT, sT = LSTMSequence.apply(x, cell.weight_ih, state[0], state[1], state[2] if fgr else none,
                                         cell.weight_hh, cell.bias_ih + cell.bias_hh, cell.weight_gr if fgr else none,
                                         *peep, valid, zh, zc, mh, cell.forget_bias, cell.cell_clip or 0.0,
                                         VARIANTS[cell.variant])
    return out, ((hT, cT, sT) if fgr else (hT, cT))
