"""``ln_lstm``'s fused CPU kernel: build it once per machine, run a training sequence through it.

One job. ``csrc/ln_lstm.cpp`` is a hand-written forward and backward pass of a whole
:class:`~rnnsearch.cells.ln_lstm.LayerNormLSTMCell` sequence (float32, CPU), the input's projection
included. Each step's GEMMs (the input's products and the recurrent ones) run, on an AVX-512 build, through the
kernels' own micro-kernel (``csrc/common.h``), each thread taking its own batch rows through the whole
sequence; elsewhere they are BLAS's ``sgemm``, split by columns over the threads (``at::mm`` where libtorch
does not export it). Everything between two GEMMs runs in one pass per batch row, vectorised with ATen's
``at::vec``; the gains' and bias' gradients accumulate per thread while each row is in cache, the input's gradient
is one more GEMM of each backward step, and both weights' gradients are one GEMM each after the loop, over the
products' gradients that the loop stored by panels. It replaces the inductor-compiled chunks for this cell on the
CPU (docs/performance.md: 0.96–1.10 of ``torch.nn.LSTM`` on the project's AVX-512 VM, median 0.99; on the earlier
AVX2 one 0.79–0.95, against inductor's 0.50–0.65; freed memory kept for all), bare, under a wrapper that acts
outside the recurrence, or under ``zoneout`` or state dropout, which it applies itself (``Zh``, ``Zc``, ``Mh``:
:func:`forward_sequence`).

It is used where the compiled path is (``model.compile`` true, or ``auto`` when it pays), for a
grad-enabled float32 CPU sequence without autocast of a cell whose arithmetic is the registry's own
(a subclass that redefines a step method gets the generic path), with ``batched_weight_grad`` on (the
kernel's gradient is first-order only, like the batched weight gradient's; switching that off gives
plain autograd). Anything else, or a failed build (with a warning), runs the generic path.

The extension (``csrc/ln_lstm.cpp``, which includes ``csrc/common.h`` and ``csrc/lstm.h``: it also holds
``lstm``'s kernel, run by :mod:`rnnsearch.cells.lstm_kernel`) is built with
:func:`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja)
into ``$RNNSEARCH_CACHE/ext/<name>``, where the name carries the sources' hash, the PyTorch and Python
versions and the CPU's vector capability, so every worker and later run loads it without building again.

Saved activations live in a :class:`Workspace` reused step after step: fresh 10–100 MB buffers every
step cost more in page faults than the kernel's own arithmetic (under glibc's default heap).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .base import _owner, step_masks

SOURCE = Path(__file__).with_name("csrc") / "ln_lstm.cpp"
STATS = 14  # per row and step: see csrc/ln_lstm.cpp
#: What a cold build costs on the project's 2-core CPU (58 s measured; rounded up), for ``model.compile: auto``.
BUILD_S = 90.0
#: Loading the built extension (torch's up-to-date check runs ninja once), rounded up.
LOAD_S = 2.0
#: The step methods the kernel reproduces: a subclass redefining any of them runs the generic path.
STEP_METHODS = ("project_input", "recur", "recur_deferred", "_step", "_ln4", "forward_sequence", "zero_state",
                "start_sequence")

#: Off: ``ln_lstm`` runs the generic compiled path (the inductor-compiled chunks), e.g. to compare the two.
ENABLED = True

_lock = threading.Lock()
_ext: Any = None
_failed: Optional[str] = None


def capability() -> str:
    """The CPU's vector capability as ATen sees it (``AVX2``, ``AVX512``, or another name: the generic build)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - an unknown CPU builds the portable variant
        return "DEFAULT"


def compile_flags(cap: Optional[str] = None) -> list[str]:
    """Compiler flags for ``at::vec`` at the CPU's capability (the ones inductor uses)."""
    cap = capability() if cap is None else cap
    if cap == "AVX512":
        arch = ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"]
    elif cap == "AVX2":
        arch = ["-mavx2", "-mfma"]
    else:
        return ["-O3", "-fopenmp", "-DCPU_CAPABILITY=DEFAULT"]
    return ["-O3", "-fopenmp", *arch, f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]


def extension_name() -> str:
    """``rnnsearch_ln_lstm_<capability>_<hash of source, flags, PyTorch and Python versions>``."""
    abi = (sys.version_info[:2], sysconfig.get_config_var("SOABI"))
    text = b"".join(f.read_bytes() for f in (SOURCE, *sorted(SOURCE.parent.glob("*.h"))))  # lstm.h, common.h too
    text += repr((torch.__version__, compile_flags(), abi)).encode()
    return f"rnnsearch_ln_lstm_{capability().lower()}_{hashlib.sha256(text).hexdigest()[:12]}"


def build_dir() -> Path:
    """Where the extension is built and cached: ``$RNNSEARCH_CACHE/ext/<name>`` (default ``~/.cache/rnnsearch``)."""
    from rnnsearch.compile import cache_dir  # (rnnsearch.compile imports the cells)

    return cache_dir().parent / "ext" / extension_name()


def is_loaded() -> bool:
    """Whether this process has the extension loaded already (a sweep worker's later trials: nothing to pay)."""
    return _ext is not None


def is_built() -> bool:
    """Whether this process has the extension loaded, or the shared cache holds a build for this machine and PyTorch."""
    return _ext is not None or (build_dir() / f"{extension_name()}.so").exists()


def load() -> Any:
    """The built extension (building it on first use, ~1 min), or None when it cannot be built here (warns once)."""
    global _ext, _failed
    with _lock:
        if _ext is not None or _failed is not None:
            return _ext
        try:
            from torch.utils.cpp_extension import load as load_extension

            try:  # the ninja wheel's binary, when ninja is not on PATH (a venv that is not activated)
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass
            path = build_dir()
            path.mkdir(parents=True, exist_ok=True)
            _ext = load_extension(extension_name(), [str(SOURCE)], build_directory=str(path),
                                  extra_cflags=compile_flags(), verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a compile error: the generic path runs
            _failed = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            warnings.warn(f"ln_lstm's fused CPU kernel could not be built ({_failed}); ln_lstm runs its generic "
                          f"compiled path instead.", RuntimeWarning, stacklevel=3)
        return _ext


class Workspace:
    """Buffers for the saved activations, handed back when their graph is freed and reused by the next sequence.

    A sequence's buffers go back only when its autograd node is freed (the graph's outputs and loss
    dropped), not after its first backward: a graph kept with ``retain_graph=True``, or saved through
    saved-tensor hooks that bypass autograd's version check (``save_on_cpu`` on a CPU), may read them
    again. Holds the free buffers of the most recent shapes only (a new shape drops the others), so what it
    keeps between steps is at most what a step needs anyway. A reused buffer's version is bumped.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[Tensor]] = {}
        # re-entrant: a graph freed by the garbage collector inside take() (a cycle) hands its buffers back then
        self._lock = threading.RLock()

    def take(self, shapes: Sequence[tuple[int, ...]], like: Tensor, fresh_drops_others: bool = True) -> list[Tensor]:
        """Buffers of ``shapes`` (``like``'s dtype and device); a shape the workspace has not seen drops the others.

        An empty shape (a buffer this call does without, e.g. ``(0,)``) gets an empty tensor, never pooled.
        """
        keys = [(tuple(s), like.dtype, like.device) for s in shapes]
        pooled = [k for k in keys if math.prod(k[0])]
        with self._lock:
            if fresh_drops_others and any(k not in self._free for k in pooled):
                self._free = {k: v for k, v in self._free.items() if k in pooled}
            out = []
            for key in keys:
                free = self._free.get(key) if math.prod(key[0]) else None
                if free:
                    t = free.pop()
                    torch.autograd.graph.increment_version(t)
                else:
                    t = torch.empty(key[0], dtype=key[1], device=key[2])
                out.append(t)
            return out

    def give_when_freed(self, ctx: Any, tensors: Sequence[Tensor]) -> None:
        """Hand ``tensors`` back once the autograd node ``ctx`` is freed, i.e. when no graph can read them again."""
        weakref.finalize(ctx, self.give, list(tensors)).atexit = False

    def give(self, tensors: Sequence[Tensor]) -> None:
        """Hand buffers back (a buffer already free is not added twice; an empty one is dropped)."""
        with self._lock:
            for t in tensors:
                if t.numel() == 0:
                    continue
                free = self._free.setdefault((tuple(t.shape), t.dtype, t.device), [])
                if not any(f is t for f in free):
                    free.append(t)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


WORKSPACE = Workspace()


def _saved_shapes(batch: int, steps: int, hidden: int, zoned: bool = False) -> list[tuple[int, ...]]:
    T, B, H = steps, batch, hidden
    # the input's products; h_{t-1}; c_{t-1} and c_T; r̂; the gates; tanh of the normalised cell; stats; zoneout:
    # the cell before zoning (else none)
    return [(T, B, 4 * H), (T, B, H), (T + 1, B, H), (T, B, 4 * H), (T, B, 4 * H), (T, B, H), (T, B, STATS),
            (T, B, H) if zoned else (0,)]


class LNLSTMSequence(torch.autograd.Function):
    """A whole ``ln_lstm`` sequence, its input's projection included: forward and backward in the C++ kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_ih: Tensor, h0: Tensor, c0: Tensor, W_hh: Tensor, g_ih: Tensor,
                g_hh: Tensor, bias: Tensor, g_c: Tensor, b_c: Tensor, valid: Tensor, Zh: Tensor, Zc: Tensor,
                Mh: Tensor, forget_bias: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        ext = load()
        x = x.contiguous()
        (B, T, _), G = x.shape, W_hh.shape[0]
        saved = WORKSPACE.take(_saved_shapes(B, T, G // 4, Zh.numel() > 0), x)  # A (T, B, 4H) first, ..., Cnew
        W_ih, W_hh, g_ih, g_hh, bias, g_c, b_c = (t.contiguous() for t in (W_ih, W_hh, g_ih, g_hh, bias, g_c, b_c))
        out, hT, cT = ext.forward(x, W_ih, h0.contiguous(), c0.contiguous(), W_hh, g_ih, g_hh, bias, g_c, b_c, valid,
                                  float(forget_bias), float(eps), Zh, Zc, Mh, *saved)
        ctx.save_for_backward(x, W_ih, W_hh, g_ih, g_hh, g_c, b_c, valid, Zh, Zc, Mh, *saved)
        WORKSPACE.give_when_freed(ctx, saved)
        return out, hT, cT

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, dhT: Tensor, dcT: Tensor) -> tuple[Optional[Tensor], ...]:
        x, W_ih, W_hh, g_ih, g_hh, g_c, b_c, valid, Zh, Zc, Mh, *saved = ctx.saved_tensors
        (B, T, _), G = x.shape, W_hh.shape[0]
        ext = load()
        (dR,) = WORKSPACE.take([(ext.dr_numel(T, B, G // 4),)], x, fresh_drops_others=False)  # back right after
        # x's gradient and W_ih's are the kernel's too, each None where not needed
        dx, dh0, dc0, dW_ih, *grads = ext.backward(dout, dhT, dcT, x, W_ih, W_hh, g_ih, g_hh, g_c, b_c, Zh, Zc, Mh,
                                                   *saved, valid, dR, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        WORKSPACE.give([dR])
        return (dx, dW_ih, dh0, dc0, *grads, None, None, None, None, None, None)


def _unchanged(cell: Any) -> bool:
    from .ln_lstm import LayerNormLSTMCell

    return all(_owner(type(cell), m) is _owner(LayerNormLSTMCell, m) for m in STEP_METHODS)


def applies(cell: Any, device_type: str, dtype: torch.dtype, amp: Optional[torch.dtype], steps: int = 2) -> bool:
    """Whether training sequences of ``steps`` steps of ``cell`` would run the kernel (before building it)."""
    from .ln_lstm import LayerNormLSTMCell

    return (ENABLED and isinstance(cell, LayerNormLSTMCell) and _unchanged(cell) and cell.batched_weight_grad
            and all(isinstance(v, (int, float)) for v in (cell.forget_bias, cell.eps))  # not a learned tensor
            and cell.weight_hh.requires_grad and steps >= 2 and device_type == "cpu" and dtype == torch.float32
            and amp is None and _failed is None)


def sequence_inputs(cell: Any, x: Tensor, state: Optional[tuple[Tensor, ...]], lengths: Optional[Tensor],
                    applies_here: Callable[..., bool]) -> Optional[tuple[tuple[Tensor, ...], Tensor]]:
    """``(initial state, valid)`` for a kernel's sequence, or None where it does not run (the checks both kernels share).

    The state's tensors are expanded to the batch (a broadcast state is allowed), ``valid`` is ``(time, batch)`` bool,
    empty without lengths.
    """
    batch, steps = x.shape[0], x.shape[1]
    if (steps < 2 or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or not applies_here(cell, "cpu", cell.weight_hh.dtype, None) or cell.batched_weights(steps) is None
            or cell.weight_hh.device.type != "cpu"
            or (state is not None and any(s.dtype != torch.float32 or s.device.type != "cpu" for s in state))
            or load() is None):
        return None
    if state is None:
        state = cell.zero_state(batch, dtype=x.dtype, device=x.device)
    state = tuple(s.expand(batch, width) for s, width in zip(state, cell.state_size))
    if lengths is None:
        valid = torch.empty(0, dtype=torch.bool)
    else:
        valid = step_masks(lengths, steps, torch.device("cpu")).squeeze(2).contiguous()  # (t, b)
    return state, valid


def zoneout_draws(shape: tuple[int, int, int], h_prob: float, c_prob: float) -> tuple[Tensor, Tensor]:
    """Zoneout's 0/1 draws (1: keep the previous value) for ``(T, B, H)``, from a seed drawn from torch's generator.

    ``torch.manual_seed`` reproduces them; the extension makes them (splitmix64, the same on any number of threads)
    because ``torch.rand`` for two ``(T, B, H)`` masks took a fifth of a training step at hidden 256.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    zh, zc = load().zoneout_draws(seed, *shape, float(h_prob), float(c_prob))
    return zh, zc


def zoneout_masks(shape: tuple[int, int, int], zoneout: Optional[tuple[float, float, bool]],
                  empty: Tensor) -> tuple[Tensor, Tensor]:
    """Both kernels' ``Zh, Zc`` for ``zoneout = (h_prob, c_prob, training)``: the draws in training, the
    probabilities in eval, ``empty`` twice without zoneout."""
    if zoneout is None:
        return empty, empty
    h_prob, c_prob, training = zoneout
    if training:
        return zoneout_draws(shape, h_prob, c_prob)
    zh, zc = (torch.full(shape, float(p), dtype=torch.float32) for p in (h_prob, c_prob))
    return zh, zc


def forward_sequence(cell: Any, x: Tensor, state: Optional[tuple[Tensor, ...]], lengths: Optional[Tensor],
                     zoneout: Optional[tuple[float, float, bool]] = None, state_dropout: Optional[Tensor] = None
                     ) -> Optional[tuple[Tensor, tuple[Tensor, Tensor]]]:
    """``cell.forward_sequence`` through the kernel, or None where it does not apply (the caller runs the generic path).

    ``zoneout`` and ``state_dropout`` as in :func:`rnnsearch.cells.lstm_kernel.forward_sequence`: a
    :class:`~rnnsearch.cells.wrappers.ZoneoutWrapper`'s ``(h_prob, c_prob, training)``, or a
    :class:`~rnnsearch.cells.wrappers.DropoutWrapper`'s ``(T, B, H)`` multipliers of the ``h`` passed on (not both).
    """
    inputs = sequence_inputs(cell, x, state, lengths, applies)
    if inputs is None or (zoneout is not None and state_dropout is not None):
        return None
    (h0, c0), valid = inputs
    none = x.new_empty(0)
    zh, zc = zoneout_masks((x.shape[1], x.shape[0], cell.hidden_size), zoneout, none)
    mh = none if state_dropout is None else state_dropout.contiguous()
    out, hT, cT = LNLSTMSequence.apply(x, cell.weight_ih, h0, c0, cell.weight_hh, cell.ln_ih_weight,
                                       cell.ln_hh_weight, cell.bias, cell.ln_c_weight, cell.ln_c_bias, valid,
                                       zh, zc, mh, cell.forget_bias, cell.eps)
    return out, (hT, cT)
