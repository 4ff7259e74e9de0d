"""``model.compile``: whether and what to ``torch.compile`` on the cell-by-cell path.

One job: decide whether compiling pays, share the inductor cache, and wrap the
right function. The fused path (``torch.nn.LSTM/GRU/RNN``) is never compiled.

*What* is compiled is the time loop (:func:`rnnsearch.cells.base.run_steps`)
over a chunk of :data:`CHUNK` steps: one graph (forward and backward) per cell
kind, width and options — shared by every layer and direction with those, as
parameters are graph inputs (a ``compile_projection`` cell's first layer has its
own, below) — called ``T / CHUNK`` times per sequence. A
shorter last chunk and any other call (a smaller last batch, a no-grad
evaluation pass) run eagerly, so a trial compiles each cell shape once,
whatever its sequence lengths. Measured for an LSTM (hidden 128, T=100) on the
project's 2-core CPU under load (docs/performance.md): the whole unrolled loop
took 279–323 s to compile cold and recompiles for every sequence length; the
per-step ``recur`` compiles in 10–19 s but is no faster than eager (the
compiled-call overhead is paid twice per step); chunks of 5 / 10 / 20 steps
compile in 15–23 / 28–31 / 54–98 s and run within 10% of the whole loop; a
warm cache brings a chunk's compile to 3–5 s. With the batched weight gradient
(:mod:`rnnsearch.cells.batched_grad`) per-chunk overhead weighs more: on the quiet
machine, paired against ``torch.nn.LSTM`` in one process, 20-step chunks ran
0.02–0.08 faster than 10-step ones in all four shapes tried (and 5-step ones
slower), for 31–38 s of cold compile instead of 28 s; hence :data:`CHUNK` = 20.

The inputs are projected before the loop, for the whole sequence, except for a cell that sets
``compile_projection`` (``ln_lstm``) and is not on the batched weight gradient's ``xp`` route (which
needs the whole sequence's projection; its slot route does not): its graph projects each chunk's inputs
itself, so the projection's layer norm fuses with the steps' arithmetic
(compiled ``ln_lstm`` 0.58–0.60 → 0.71–0.72 of ``torch.nn.LSTM`` under glibc's default heap; +0.035 for ``gru``, paired, too little
to be worth its cost: such a graph depends on the layer's input width, so a stack's first layer needs its own).

*How* it is compiled: ``torch.compile(run_steps, dynamic=False)`` with
:func:`inductor_options` — on CPU, tanh in inductor's exp form (cheaper than its
SLEEF tanh, within 1.8e-7 of ``torch.tanh``).

*The cache*: ``TORCHINDUCTOR_CACHE_DIR`` is set (unless the user set it) to
``$RNNSEARCH_CACHE/inductor`` (default ``~/.cache/rnnsearch/inductor``), so all
trials and worker processes of a sweep, and later sweeps, reuse each other's
compiled graphs (inductor's FX-graph and AOTAutograd caches). A marker file
per compiled cell signature records that a warm compile exists.

*Two cells have their own kernels*: where the compiled path runs, a float32 CPU training sequence of
``ln_lstm`` or of an ``lstm`` without projection (any variant), bare or under wrappers that act outside the
recurrence (and, around the bare cell, zoneout or state dropout), runs a hand-written fused forward and backward
(:mod:`rnnsearch.cells.ln_lstm_kernel`, :mod:`rnnsearch.cells.lstm_kernel`) instead of inductor's graphs
(docs/performance.md; ``RNNCell.kernel_applies``). One extension holds both; it is built once per machine and
PyTorch version (about a minute), whatever the cells' shapes.

*How ``auto`` decides* (:func:`decide`, a pure function): compiling pays when the
training budget's recurrent steps (optimizer steps × sequence length × cells)
times the per-step time compiling saves exceeds :data:`MARGIN` × the expected
compile time (cold per new cell shape, warm for those the cache already holds,
plus building or loading that kernel where cells run it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from rnnsearch.cells.base import RNNCell, State, run_steps
from rnnsearch.errors import choice_error

COMPILE_MODES = ("auto", "true", "false")
CHUNK = 20  # time steps per compiled call
MARGIN = 1.5  # auto compiles only when the expected saving exceeds MARGIN × the expected compile time
CACHE_ENV = "RNNSEARCH_CACHE"
GRAPH_VERSION = 5  # bumped when what run_steps compiles changes (2: batched weight gradient; 3: tanh; 4: projection;
# 5: the slot route)
#: Environment variable of inductor's own switch for the decomposed tanh; when set, :func:`inductor_options` obeys it.
DECOMPOSE_TANH_ENV = "TORCHINDUCTOR_CPP_USE_DECOMPOSE_TANH"


@dataclass(frozen=True)
class Costs:
    """What compiling one cell shape costs and saves on a device type (measured, see docs/performance.md)."""

    cold_s: float  # compile time of a new cell shape (forward + backward graph)
    warm_s: float  # the same from a warm inductor cache
    saving_s: float  # time saved per recurrent step (forward + backward) by the compiled chunk
    kernel_saving_s: float = 0.0  # the same for a cell that runs a hand-written fused kernel instead


COSTS: dict[str, Costs] = {  # rounded up (compile) and down (saving) from docs/performance.md
    "cpu": Costs(cold_s=90.0, warm_s=6.0, saving_s=2e-4, kernel_saving_s=4e-4),  # 2-core CPU, 20-step chunk:
    # 31-38 s cold (quiet), 54-98 s under load; 3-5 s warm. The kernels: 4.5e-4 s a step on lstm_odyssey's digits
    # trials (hidden 16-128, batch 32), 5.4-5.7e-4 s in scripts/bench.py (hidden 128 and 256, batch 64)
    "cuda": Costs(cold_s=45.0, warm_s=5.0, saving_s=2e-4),  # H200: 7-16 s cold for a 10-step chunk (20 steps:
    # not measured, scaled as on the CPU); saves 0.23-0.32 ms/step
}


@dataclass(frozen=True)
class Decision:
    """Whether to compile, and why (logged by the training loop)."""

    compile: bool
    reason: str


def compile_mode(value: Any) -> str:
    """Normalise ``model.compile`` (YAML gives booleans for true/false) to auto|true|false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "false"
    if isinstance(value, str) and value.lower() in COMPILE_MODES:
        return value.lower()
    raise choice_error("model.compile", value, COMPILE_MODES)


def cache_dir() -> Path:
    """The inductor cache all trials share: ``$RNNSEARCH_CACHE/inductor`` or ``~/.cache/rnnsearch/inductor``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rnnsearch")
    return Path(root) / "inductor"


def setup_cache() -> Path:
    """Point inductor at the shared cache (a user's own ``TORCHINDUCTOR_CACHE_DIR`` wins); returns it.

    The environment variable is inherited by worker processes, so every worker of
    a sweep compiles into, and loads from, the same directory.
    """
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir())))
    path.mkdir(parents=True, exist_ok=True)
    import torch._dynamo

    # every compiled graph is a variant of one function (run_steps): let a long sweep worker hold many
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return path


def compiler_available(device_type: str) -> bool:
    """Whether inductor can build code here: a C++ compiler for CPU, Triton for CUDA."""
    if device_type == "cpu":
        return any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def decide(mode: str, *, cells: int, recur_steps: int, new_shapes: int, cached_shapes: int,
           device_type: str, available: bool = True, kernel_cells: int = 0, kernel_built: bool = False,
           kernel_loaded: bool = False, kernel_steps: Optional[int] = None) -> Decision:
    """Whether a trial compiles its cell-by-cell path: a pure function of the budget and the cache.

    Args:
        mode: ``auto``, ``true`` or ``false`` (see :func:`compile_mode`).
        cells: cells run step by step (layers × directions); 0 for a fused stack.
        recur_steps: recurrent steps the training budget runs, over all cells
            (optimizer steps × sequence length × cells).
        new_shapes: distinct cell shapes the cache does not hold (each a cold compile).
        cached_shapes: compiles the cache already holds, or repeats of a shape
            compiled earlier in the same run (each a warm compile).
        device_type: ``cpu`` or ``cuda`` (others never compile).
        available: whether inductor can compile here (:func:`compiler_available`).
        kernel_cells: cells that run a hand-written kernel instead of inductor's graphs (``lstm``,
            ``ln_lstm`` on the CPU; not counted in the shapes).
        kernel_built: whether that kernel is built (:data:`~rnnsearch.cells.ln_lstm_kernel.LOAD_S` to
            load it) or must be built first, once per machine and PyTorch version
            (:data:`~rnnsearch.cells.ln_lstm_kernel.BUILD_S`).
        kernel_loaded: whether this process has loaded it already (free: a sweep worker's later trials).
        kernel_steps: the part of ``recur_steps`` the kernel cells run (None: their share of the cells).
    """
    mode = compile_mode(mode)
    if mode == "false":
        return Decision(False, "model.compile=false")
    if cells == 0:
        return Decision(False, "fused torch.nn path (already one kernel; never compiled)")
    if not available or device_type not in COSTS:
        why = f"no compiler for {device_type} (a C++ compiler on CPU, Triton on CUDA)"
        return Decision(False, why if mode == "auto" else f"model.compile=true, but {why}: running eagerly")
    if mode == "true":
        return Decision(True, "model.compile=true")
    c = COSTS[device_type]
    from rnnsearch.cells.ln_lstm_kernel import BUILD_S, LOAD_S

    kernel_s = 0.0 if not kernel_cells or kernel_loaded else LOAD_S if kernel_built else BUILD_S
    cost = new_shapes * c.cold_s + cached_shapes * c.warm_s + kernel_s
    if kernel_steps is None:
        kernel_steps = recur_steps * kernel_cells // cells
    saving = (recur_steps - kernel_steps) * c.saving_s + kernel_steps * c.kernel_saving_s  # a kernel step saves more
    verdict = saving > MARGIN * cost
    state = "loaded" if kernel_loaded else "built" if kernel_built else "to build"
    builds = f"; fused CPU kernels {state}" if kernel_cells else ""
    why = (f"budget of {recur_steps:,} recurrent steps saves ~{saving:.0f} s "
           f"{'>' if verdict else '<='} {MARGIN:g} x ~{cost:.0f} s to compile "
           f"({new_shapes} new, {cached_shapes} cached cell shape(s){builds})")
    return Decision(verdict, why)


def inductor_options() -> dict[str, Any]:
    """Inductor options for the compiled chunks: on CPU, ``tanh`` as ``2 / (1 + exp(-2x)) - 1``.

    Inductor's C++ backend computes ``tanh`` with SLEEF's 1-ulp ``tanhf``, 2.5x the cost of its
    ``exp`` on the project's CPU; an LSTM step has three (two forward, one recomputed in backward),
    beside three sigmoids that inductor already writes with ``exp``. The exp form is what inductor
    itself generated until early 2025 (pytorch#148254 moved to SLEEF, because its *relative* error near
    0 confused a model that fed tanh into ``atan2``) and keeps as the switch ``cpp.use_decompose_tanh``
    (pytorch#152542, off by default). Its absolute error is at most 1.8e-7 over [-12, 12], against
    3e-8 for ``torch.tanh`` and 9e-8 for inductor's sigmoid: harmless for gates and cell outputs
    bounded by 1. It made compiled LSTM training steps 1–4% faster here (paired runs of single shapes:
    +2% and +4%; over the eight LSTM rows of ``scripts/bench.py --paths adg``: median +0.015,
    docs/performance.md). Setting
    ``TORCHINDUCTOR_CPP_USE_DECOMPOSE_TANH`` (0 or 1) yourself overrides this choice (read at every
    compile, so the value is in the graph key and cache signature); a PyTorch without the switch gets no
    options. CUDA kernels are unaffected.
    """
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.cpp, "use_decompose_tanh"):
        return {}
    return {"cpp.use_decompose_tanh": os.environ.get(DECOMPOSE_TANH_ENV, "1") == "1"}


# -- signatures and the warm-cache markers ------------------------------------------------------------

def cell_signature(cell: RNNCell, batch: int, dtype: torch.dtype, amp: Optional[torch.dtype], device_type: str,
                   masked: bool, chunk: int = CHUNK, deferred: bool = False) -> str:
    """A key for one compiled graph: the cell (its repr has class, sizes, options, wrappers) and the call.

    ``deferred``: whether the steps run ``recur_deferred`` (the batched weight gradient).
    """
    text = "|".join(map(str, (torch.__version__, GRAPH_VERSION, sorted(inductor_options().items()),
                              cell.compile_projection,
                              type(cell).__module__, type(cell).__qualname__, repr(cell), batch, dtype, amp,
                              device_type, masked, chunk, cell.training, deferred)))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _marker(signature: str) -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()) / "rnnsearch" / signature


def is_cached(signature: str) -> bool:
    """Whether a graph with this signature was compiled into the shared cache before."""
    return _marker(signature).exists()


def _mark_cached(signature: str) -> None:
    try:
        path = _marker(signature)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:  # a read-only cache only loses the warm-start hint
        pass


# -- the compiled runner ------------------------------------------------------------------------------

#: One compiled ``run_steps`` per graph: cells of the same kind, width and options (the layers of a stack,
#: both directions, the next trial in the same worker) share it, since parameters are graph inputs.
_SHARED: dict[str, Any] = {}


def _graph_key(cell: RNNCell, call_key: tuple[Any, ...]) -> str:
    """What decides the graph: every (wrapped) cell's class, width, options and mode, and the call's shapes.

    The input width is left out (the input projection uses it, before the loop) unless the graph
    projects its inputs itself (``project``, then the chunk's shape in ``call_key`` carries it); dynamo's
    guards still check everything, so a key that is too coarse costs a recompile, never a wrong result.
    """
    parts = [(type(m).__module__, type(m).__qualname__, getattr(m, "hidden_size", None), m.training,
              tuple((k, getattr(m, k, None)) for k in getattr(m, "options", ())))
             for m in cell.modules()]
    return repr((parts, call_key, sorted(inductor_options().items())))

class ChunkRunner:
    """Runs a cell's time loop :data:`CHUNK` steps per compiled call (installed as ``cell.sequence_runner``).

    Only grad-enabled calls use the compiled graph; it is compiled for the first
    full chunk's shapes (batch, widths, dtype, masked or not, autocast) and
    reused for calls with the same ones; any other call runs eagerly instead of
    recompiling (and ``eager_on_recompile`` covers any other guard dynamo adds).
    A compile error falls back to the eager loop with a warning.
    """

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = int(chunk)
        self._fn: Any = None
        self._key: Any = None  # what the graph was compiled for
        self.failed: Optional[str] = None
        self.signature: Optional[str] = None
        self.compiled_calls = 0  # chunks handed to the compiled function (for tests and logs)
        self.kernel_calls = 0  # sequences a cell ran through its own fused kernel instead (lstm, ln_lstm on the CPU)
        self._sequences = 0

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles start uncompiled
        return {"chunk": self.chunk}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["chunk"])

    def __deepcopy__(self, memo: dict[int, Any]) -> "ChunkRunner":
        return ChunkRunner(self.chunk)

    def __call__(self, cell: RNNCell, xp: Tensor, state: State, valid: Optional[Tensor],
                 deferred: bool = False, project: bool = False, slot: Optional[Tensor] = None) -> tuple[Tensor, State]:
        K = self.chunk
        if self.failed or not torch.is_grad_enabled() or xp.shape[1] < K:
            return run_steps(cell, xp, state, valid, deferred, project, slot)
        self._sequences += 1
        if self._sequences == 2 and self.signature is not None:  # one step (forward + backward) done
            _mark_cached(self.signature)
        # A state that needs no grad (the zero state) would be a second graph: make every chunk alike.
        state = tuple(s if s.requires_grad else s.detach().requires_grad_() for s in state)
        vs = valid.split(K, 0) if valid is not None else None
        ss = slot.split(K, 1) if slot is not None else None
        outs = []
        for i, xc in enumerate(xp.split(K, 1)):
            vc = None if vs is None else vs[i]
            sc = None if ss is None else ss[i]
            if xc.shape[1] == K and not self.failed and self._key in (None, _call_key(xc, state, vc, deferred,
                                                                                       project, sc)):
                out, state = self._compiled(cell, xc, state, vc, deferred, project, sc)
            else:
                out, state = run_steps(cell, xc, state, vc, deferred, project, sc)
            outs.append(out)
        return (torch.cat(outs, 1) if len(outs) > 1 else outs[0]), state

    def _compiled(self, cell: RNNCell, xc: Tensor, state: State, vc: Optional[Tensor],
                  deferred: bool, project: bool, sc: Optional[Tensor]) -> tuple[Tensor, State]:
        if self._fn is None:
            setup_cache()
            dev = xc.device.type
            amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            self.signature = cell_signature(cell, xc.shape[0], cell_dtype(cell), amp, dev, vc is not None, self.chunk,
                                            deferred)
            self._key = _call_key(xc, state, vc, deferred, project, sc)
            graph = _graph_key(cell, self._key)
            if graph not in _SHARED:
                _SHARED[graph] = torch.compile(run_steps, dynamic=False, options=inductor_options())
            self._fn = _SHARED[graph]
            try:  # the first call compiles (or finds the graph another cell compiled)
                result = self._fn(cell, xc, state, vc, deferred, project, sc)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                _SHARED.pop(graph, None)
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                warnings.warn(f"torch.compile failed for {type(cell).__name__} ({self.failed}); "
                              f"this cell runs eagerly.", RuntimeWarning, stacklevel=2)
                return run_steps(cell, xc, state, vc, deferred, project, sc)
            self.compiled_calls += 1
            return result
        self.compiled_calls += 1
        with torch.compiler.set_stance("eager_on_recompile"):
            return self._fn(cell, xc, state, vc, deferred, project, sc)


def _call_key(xc: Tensor, state: State, vc: Optional[Tensor], deferred: bool, project: bool,
              sc: Optional[Tensor] = None) -> tuple[Any, ...]:
    dev = xc.device.type
    slot = None if sc is None else (sc.shape, sc.dtype)
    states = tuple((s.shape, s.dtype) for s in state)
    return (xc.shape, xc.dtype, xc.device, vc is None, deferred, project, slot, states,
            torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev))


def cell_dtype(cell: nn.Module) -> torch.dtype:
    for p in cell.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def step_cells(model: nn.Module) -> list[RNNCell]:
    """The cells a model runs step by step (the outermost wrapper of each layer direction)."""
    from rnnsearch.layers import RecurrentLayer

    return [m.cell for m in model.modules() if isinstance(m, RecurrentLayer)]


def install(model: nn.Module, chunk: int = CHUNK) -> int:
    """Give every step-by-step cell of ``model`` a compiled :class:`ChunkRunner`; returns how many."""
    cells = step_cells(model)
    for cell in cells:
        cell.sequence_runner = ChunkRunner(chunk)
    return len(cells)


def uninstall(model: nn.Module) -> None:
    """Back to the eager loop."""
    for cell in step_cells(model):
        cell.__dict__.pop("sequence_runner", None)


def prepare(model: nn.Module, mode: Any, *, optimizer_steps: int, seq_len: int, batch_size: int,
            masked: bool, device: Union[torch.device, str], amp: Optional[torch.dtype] = None,
            chunk: int = CHUNK) -> Decision:
    """Decide for a training run (:func:`decide`) and install the compiled runners if it pays.

    Args:
        model: a :func:`~rnnsearch.build_model` model (fused stacks are left alone).
        mode: ``model.compile`` (auto | true | false).
        optimizer_steps: the trial's budget: ``train.epochs`` × steps per epoch (capped by ``train.max_steps``).
        seq_len: time steps per training sequence (the longest).
        batch_size: training batch size (the compiled shape).
        masked: whether batches carry ``lengths`` (variable-length sequences).
        device: the training device.
        amp: the autocast dtype, or None.
    """
    from rnnsearch.cells import ln_lstm_kernel

    dev = torch.device(device).type
    cells = step_cells(model)
    seen: set[str] = set()
    new = cached = kernels = 0
    for cell in cells:
        if cell.kernel_applies(dev, cell_dtype(cell), amp, seq_len):  # a fused CPU kernel, not inductor's graphs
            kernels += 1
            continue
        deferred = cell.batched_weights(seq_len) is not None
        sig = cell_signature(cell, batch_size, cell_dtype(cell), amp, dev, masked, chunk, deferred)
        if sig in seen or is_cached(sig):
            cached += 1
        else:
            new += 1
        seen.add(sig)
    full_chunks = seq_len // chunk * chunk  # what compiled chunks run; a kernel runs every step
    kernel_steps = optimizer_steps * seq_len * kernels
    decision = decide(mode, cells=len(cells), kernel_steps=kernel_steps,
                      recur_steps=optimizer_steps * full_chunks * (len(cells) - kernels) + kernel_steps,
                      new_shapes=new, cached_shapes=cached, device_type=dev,
                      available=compile_mode(mode) == "false" or not cells or compiler_available(dev),
                      kernel_cells=kernels, kernel_built=kernels > 0 and ln_lstm_kernel.is_built(),
                      kernel_loaded=kernels > 0 and ln_lstm_kernel.is_loaded())
    if decision.compile:
        setup_cache()
        install(model, chunk)
        if kernels and ln_lstm_kernel.load() is not None:  # build (or load) it now, not inside the first step
            decision = Decision(True, f"{decision.reason}; {kernels} cell(s) run a fused CPU kernel")
        elif kernels:  # the build failed (it warned): those cells compile inductor's graphs after all
            decision = Decision(True, f"{decision.reason}; the fused CPU kernels did not build: inductor compiles "
                                      f"those cells")
    else:
        uninstall(model)
    return decision
