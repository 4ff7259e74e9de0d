"""Training-speed benchmark: hand-written torch.nn vs rnnsearch's fused, eager and compiled cell paths.

For each configuration it times full training steps (forward, backward, Adam)
on random data — batch 64, length 100, input 32, a linear head on the last step
and MSE — and prints tokens/s of

  (a) a hand-written ``torch.nn.LSTM``/``GRU`` + ``Linear`` loop (the baseline),
  (b) ``build_model(..., fused=always)`` — rnnsearch's fused path,
  (c) ``build_model(..., fused=never)`` — the registry cell run step by step (eager),
  (d) the same with ``model.compile=true`` — the time loop compiled a chunk of
      steps at a time (``rnnsearch.compile``; its first-step compile time is shown),

and, on request (``--paths abcdef``), the ablation of the batched recurrent
weight gradient (``rnnsearch.cells.batched_grad``):

  (e) path (c) with ``batched_weight_grad = False`` (autograd's per-step weight gradient),
  (f) path (d) likewise (for ``gru``, which does not batch its weight gradient, (e)/(f) are (c)/(d)),

and (``--paths adg``) the ablation of the compiled chunks' exp-based tanh (``rnnsearch.compile.inductor_options``):

  (g) path (d) compiled with inductor's SLEEF ``tanh`` (``TORCHINDUCTOR_CPP_USE_DECOMPOSE_TANH=0`` for its calls),

and (``--paths adh``) what the hand-written CPU kernels of ``lstm`` and ``ln_lstm`` (``rnnsearch.cells.lstm_kernel``,
``rnnsearch.cells.ln_lstm_kernel``, which path (d) runs for them on a CPU in float32) gain over inductor's
compiled chunks:

  (h) path (d) with the kernels switched off (``ln_lstm_kernel.ENABLED = False`` for its calls; ``gru``: (d)),

each as a ratio to (a), plus the achieved GFLOP/s of (a) against the matmul
throughput measured on the same machine in the same run (float32, or bfloat16
with ``--amp bf16``). Timing alternates the paths in rounds, so background load
hurts all paths alike; tok/s is each path's best round, and the ratio is the
median over rounds of the round's ratio to (a) (a paired estimate, robust to a
machine whose speed drifts), followed by the lowest and highest round's ratio.

``--memory`` reports instead the peak memory of one training step on the
adding task (input 2, batch 64) at T=100 and T=1000: on CPU the growth of the
process's peak resident memory during the step (each measurement in a fresh
process), on CUDA ``torch.cuda.max_memory_allocated`` above the memory held
before the step.

    python scripts/bench.py                      # LSTM/GRU, hidden 128/256, 1-2 layers, uni/bi
    python scripts/bench.py --quick              # LSTM, hidden 128 and 256, 1 layer
    python scripts/bench.py --quick --cells peephole,proj,ln_lstm   # the other registry LSTMs
    python scripts/bench.py --quick --cells nig,nfg,nog,niaf,noaf,np,cifg,fgr --paths acdh   # Greff's variants
    python scripts/bench.py --quick --cells zoneout,vdropout,sdropout --paths acdh   # wrapped lstm
    python scripts/bench.py --quick --cells ln_zoneout,ln_sdropout --paths acdh      # wrapped ln_lstm
    python scripts/bench.py --device cuda --amp bf16 --quick
    python scripts/bench.py --memory             # peak memory, T=100 and T=1000, hidden 128/256
    python scripts/bench.py --memory --quick --cells ln_lstm --paths adh   # the ln_lstm kernel's memory
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Optional

import torch
from torch import nn

from rnnsearch import ConfigError, build_model
from rnnsearch import compile as compiling
from rnnsearch.cells import ln_lstm_kernel, lstm_kernel
from rnnsearch.cells.base import RNNCell
from rnnsearch.heap import keep_freed_memory

PATHS = {"a": "torch.nn", "b": "fused", "c": "cell eager", "d": "cell compiled",
         "e": "eager, step dW", "f": "compiled, step dW", "g": "compiled, SLEEF tanh", "h": "compiled, no kernel"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gflops(mm: Callable[[], Any], flop: float, reps: int, device: torch.device, rounds: int = 3) -> float:
    """GFLOP/s of ``mm`` (``flop`` each call), best of ``rounds`` rounds of ``reps`` calls."""
    mm()
    best = 0.0
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            mm()
        sync(device)
        best = max(best, flop * reps / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 20) -> float:
    """Matmul throughput of this machine (GFLOP/s): ``torch.mm`` of two n x n matrices, best of a few rounds."""
    if device.type == "cuda":
        n, reps = 4096, 50
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return gflops(lambda: torch.mm(a, b), 2 * n**3, reps, device)


def kernel_gemm_gflops() -> Optional[float]:
    """The CPU kernels' own GEMM throughput at a step's shape, (64 x 256) @ (256 x 1024), where their AVX-512
    micro-kernel is built (None elsewhere: they call the BLAS that torch.mm calls). On a CPU whose BLAS does not use
    AVX-512 (MKL on AMD takes its AVX2 path) it exceeds torch.mm's, and is the better measure of the machine."""
    ext = ln_lstm_kernel.load() if ln_lstm_kernel.capability() == "AVX512" else None
    if ext is None:
        return None
    a, w = torch.randn(64, 256), torch.randn(1024, 256)  # 100 steps' products over one packing of w, as in a sequence
    return gflops(lambda: ext.packed_mm(a, w, True, 100), 100 * 2 * 64 * 256 * 1024, 10, torch.device("cpu"), rounds=5)


#: The benchmarked cells: the registry cell config (sizes added), and the torch.nn module of the same size it is
#: compared with. ``peephole``, ``proj`` and ``ln_lstm`` are the issue's "any registry cell": peephole LSTM,
#: projected LSTM (num_proj = hidden / 2, against torch.nn.LSTM's proj_size) and the layer-norm LSTM; ``nig`` …
#: ``fgr``: Greff et al.'s LSTM variants, with peepholes as in the paper (``np``: none), against torch.nn.LSTM;
#: ``zoneout``, ``vdropout``, ``sdropout``: the plain lstm under a wrapper (:data:`WRAPPED`); ``ln_zoneout``,
#: ``ln_sdropout``: ``ln_lstm`` under the same.
CELLS: dict[str, dict[str, Any]] = {
    "lstm": {"name": "lstm", "forget_bias": 0.0},  # forget_bias 0: torch.nn's LSTM has none
    "gru": {"name": "gru"},
    "peephole": {"name": "lstm", "forget_bias": 0.0, "use_peepholes": True},
    "proj": {"name": "lstm", "forget_bias": 0.0},  # num_proj: proj_width()
    "ln_lstm": {"name": "ln_lstm", "forget_bias": 0.0},
    **{v.lower(): {"name": "lstm", "forget_bias": 0.0, "variant": v, "use_peepholes": v != "NP"}
       for v in ("NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR")},
    "zoneout": {"name": "lstm", "forget_bias": 0.0},
    "vdropout": {"name": "lstm", "forget_bias": 0.0},
    "sdropout": {"name": "lstm", "forget_bias": 0.0},
    "ln_zoneout": {"name": "ln_lstm", "forget_bias": 0.0},
    "ln_sdropout": {"name": "ln_lstm", "forget_bias": 0.0},
}
#: Wrapped cells (``model.wrappers``), against the bare torch.nn.LSTM: zoneout (Krueger et al.'s 0.05 / 0.5),
#: variational input and output dropout, and variational state (recurrent) and output dropout.
WRAPPED: dict[str, list[dict[str, Any]]] = {
    "zoneout": [{"name": "zoneout", "h_prob": 0.05, "c_prob": 0.5}],
    "vdropout": [{"name": "dropout", "input_keep_prob": 0.9, "output_keep_prob": 0.9, "variational_recurrent": True}],
    "sdropout": [{"name": "dropout", "state_keep_prob": 0.9, "output_keep_prob": 0.9, "variational_recurrent": True}],
}
WRAPPED["ln_zoneout"], WRAPPED["ln_sdropout"] = WRAPPED["zoneout"], WRAPPED["sdropout"]


def proj_width(kind: str, hidden: int) -> Optional[int]:
    """The projection width of ``proj`` (hidden / 2; torch.nn's proj_size), None for the other cells."""
    return hidden // 2 if kind == "proj" else None


def cell_config(kind: str, hidden: int) -> dict[str, Any]:
    proj = proj_width(kind, hidden)
    return {**CELLS[kind], **({"num_proj": proj} if proj else {})}


class Baseline(nn.Module):
    """The hand-written reference: torch.nn recurrent module + linear head on the last step."""

    def __init__(self, kind: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        cls = nn.GRU if kind == "gru" else nn.LSTM
        proj = proj_width(kind, hidden)
        self.rnn = cls(input_size, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                       **({"proj_size": proj} if proj else {}))
        self.head = nn.Linear((proj or hidden) * (2 if bidirectional else 1), 1)

    def forward(self, x: torch.Tensor, lengths: None = None) -> torch.Tensor:
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        last = torch.cat([h[-2], h[-1]], -1) if self.rnn.bidirectional else h[-1]
        return self.head(last)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              amp: Optional[torch.dtype] = None) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctx = (lambda: torch.autocast(x.device.type, dtype=amp)) if amp is not None else nullcontext

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with ctx():
            out = model(x, None)
        loss = nn.functional.mse_loss(out.float(), y)
        loss.backward()
        opt.step()

    return step


def make_models(kind: str, input_size: int, hidden: int, layers: int, bi: bool, paths: str,
                chunk: int) -> dict[str, nn.Module]:
    """The benchmarked models, same sizes; path (b) is left out for a cell the fused path cannot run."""
    cfg: dict[str, Any] = {"cell": cell_config(kind, hidden),
                           "model": {"hidden_size": hidden, "num_layers": layers, "bidirectional": bi,
                                     "embedding_size": 0, "fused": "always", "compile": "false",
                                     "wrappers": WRAPPED.get(kind, [])}}
    models: dict[str, nn.Module] = {}
    for p in paths:
        if p == "a":
            models[p] = Baseline(kind, input_size, hidden, layers, bi)
        elif p == "b":
            try:
                models[p] = build_model(cfg, input_size, 1)
            except ConfigError:  # model.fused=always on a stack torch.nn cannot run: no path (b)
                pass
        else:
            models[p] = build_model({**cfg, "model": {**cfg["model"], "fused": "never"}}, input_size, 1)
            if p in "ef":  # the ablation: autograd's per-step recurrent weight gradient
                for m in models[p].modules():
                    if isinstance(m, RNNCell):
                        m.batched_weight_grad = False
            if p in "dfgh":
                compiling.setup_cache()
                compiling.install(models[p], chunk)
    return models


def with_exact_tanh(step: Callable[[], None]) -> Callable[[], None]:
    """Path (g): run ``step`` with inductor's own tanh switch off, so its compile keeps SLEEF's tanh."""

    def run() -> None:
        old = os.environ.get(compiling.DECOMPOSE_TANH_ENV)
        os.environ[compiling.DECOMPOSE_TANH_ENV] = "0"
        try:
            step()
        finally:
            if old is None:
                del os.environ[compiling.DECOMPOSE_TANH_ENV]
            else:
                os.environ[compiling.DECOMPOSE_TANH_ENV] = old

    return run


def without_kernel(step: Callable[[], None]) -> Callable[[], None]:
    """Path (h): run ``step`` with the fused CPU kernels off, so the compiled path is inductor's graphs."""

    def run() -> None:
        ln_lstm_kernel.ENABLED = False
        try:
            step()
        finally:
            ln_lstm_kernel.ENABLED = True

    return run


def step_flops(kind: str, batch: int, steps: int, inp: int, hidden: int, layers: int, bi: bool) -> float:
    """Matmul FLOPs of one training step of the baseline (a) (forward + backward ≈ 3 × forward)."""
    gates = 3 if kind == "gru" else 4
    out = proj_width(kind, hidden) or hidden  # the recurrent state's width
    dirs = 2 if bi else 1
    total, width = 0.0, inp
    for _ in range(layers):
        total += dirs * 2 * batch * steps * (gates * hidden * (width + out) + (hidden * out if out != hidden else 0))
        width = out * dirs
    return 3 * total


def time_paths(steps: dict[str, Callable[[], None]], rounds: int, iters: int,
               device: torch.device) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each path in every round (paths alternate round by round), and each path's warm-up."""
    warmup = {}
    for name, fn in steps.items():  # warm-up: the compiled path compiles here
        sync(device)
        t0 = time.perf_counter()
        fn()
        fn()
        sync(device)
        warmup[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return times, warmup


def paired_ratio(base: list[float], path: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest over rounds of (a)'s time / the path's time in the same round."""
    r = sorted(a / p for a, p in zip(base, path))
    return statistics.median(r), r[0], r[-1]


def speed_table(args: argparse.Namespace, device: torch.device, amp: Optional[torch.dtype]) -> None:
    # twice each, the best: a fresh process' first seconds measured as low as half the rate (the VM's clock)
    peak = max(gemm_gflops(device, amp or torch.float32) for _ in range(2))
    own = None
    if device.type == "cpu" and amp is None:
        own = max(kernel_gemm_gflops() or 0.0 for _ in range(2)) or None
    measured = f"{peak:.1f} GFLOP/s" if own is None else (
        f"{max(peak, own):.1f} GFLOP/s (torch.mm {peak:.1f}, the kernels' micro-kernel at a step's shape {own:.1f})")
    peak = max(peak, own or 0.0)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    load = f"; load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    heap = "freed memory kept (rnnsearch.heap)" if args.heap_kept else "glibc's default heap"
    print(f"torch {torch.__version__} on {device.type} ({where}); {'bf16' if amp else 'float32'} GEMM peak "
          f"{measured}{load}; {heap}")
    print(f"batch {args.batch}, length {args.steps}, input {args.input}; training step = forward + backward + Adam"
          f"{'; bf16 autocast' if amp else ''}; compiled chunk {args.chunk} steps\n")
    grid = (itertools.product(args.cells.split(","), [128, 256], [1], [False]) if args.quick
            else itertools.product(args.cells.split(","), [128, 256], [1, 2], [False, True]))
    paths = args.paths
    header = f"{'cell':<8} {'H':>4} {'L':>2} {'dir':>3} | {'(a) tok/s':>10} {'GFLOP/s':>8} {'%peak':>6}"
    for p in paths[1:]:
        header += f" | {'(' + p + ') ' + PATHS[p]:>21} {'/(a) [range]':>17}"
    if "d" in paths:
        header += f" | {'compile s':>9}"
    print(header)
    print("-" * len(header))
    x = torch.randn(args.batch, args.steps, args.input, device=device)
    y = torch.randn(args.batch, 1, device=device)
    for kind, hidden, layers, bi in grid:
        models = make_models(kind, args.input, hidden, layers, bi, paths, args.chunk)
        steps = {k: make_step(m.to(device), x, y, amp) for k, m in models.items()}
        if "g" in steps:
            steps["g"] = with_exact_tanh(steps["g"])
        if "h" in steps:
            steps["h"] = without_kernel(steps["h"])
        times, warm = time_paths(steps, args.rounds, args.iters, device)
        t = {k: min(v) for k, v in times.items()}
        tok = {k: args.batch * args.steps / v for k, v in t.items()}
        gflops = step_flops(kind, args.batch, args.steps, args.input, hidden, layers, bi) / t["a"] / 1e9
        line = (f"{kind:<8} {hidden:>4} {layers:>2} {'bi' if bi else 'uni':>3} | {tok['a']:>10,.0f} {gflops:>8.1f} "
                f"{100 * gflops / peak:>5.0f}%")
        for p in paths[1:]:
            if p not in times:  # (b) for a cell the fused path cannot run
                line += f" | {'(not fusable)':>21} {'':>17}"
                continue
            med, lo, hi = paired_ratio(times["a"], times[p])
            line += f" | {tok[p]:>21,.0f} {med:>5.2f} [{lo:.2f}-{hi:.2f}]"
        if "d" in paths:
            line += f" | {max(warm['d'] - 2 * t['d'], 0.0):>9.1f}"
        print(line, flush=True)


# -- memory -----------------------------------------------------------------------------------------------

def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_cpu_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next peak is the step's own
    except (OSError, AttributeError):
        pass


def measure_memory(path: str, steps: int, hidden: int, device: torch.device, chunk: int,
                   amp: Optional[torch.dtype], kind: str = "lstm") -> float:
    """Peak memory (MiB) one training step adds, on the adding task with batch 64 (after one warm-up step)."""
    from rnnsearch.tasks.adding import AddingTask

    batch = AddingTask(seq_len=steps).generate(64, torch.Generator().manual_seed(0)).to(device)
    model = make_models(kind, 2, hidden, 1, False, path, chunk)[path].to(device)
    step = make_step(model, batch.x, batch.y, amp)
    if path == "h":
        step = without_kernel(step)
    step()  # warm-up: Adam's state, the compile of (d)
    for kernel in (ln_lstm_kernel, lstm_kernel):  # the measured step allocates the saved activations, as a first does
        kernel.WORKSPACE.clear()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_cpu_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    before = _proc_kb("VmRSS")
    step()
    return (_proc_kb("VmHWM") - before) / 1024


def memory_table(args: argparse.Namespace, device: torch.device, amp: Optional[torch.dtype]) -> None:
    how = "CUDA max_memory_allocated" if device.type == "cuda" else "growth of peak RSS, fresh process each"
    kind = (args.cells or "lstm").split(",")[0]
    print(f"peak memory of one training step (MiB), {kind}, adding task, batch 64, on {device.type}"
          f"{' (bf16 autocast)' if amp else ''}; {how}\n")
    sizes = [(h, t) for h in ([128, 256] if not args.quick else [256]) for t in (100, 1000)]
    header = f"{'H':>4} {'T':>5} | " + " | ".join(f"{'(' + p + ') ' + PATHS[p]:>16}" for p in args.paths)
    runs = make_models(kind, 2, 8, 1, False, args.paths, args.chunk)  # (b) is absent where the fused path cannot run
    print(header)
    print("-" * len(header))
    for hidden, steps in sizes:
        cells = []
        for p in args.paths:
            if p not in runs:
                cells.append(f"{'-':>16}")
                continue
            if device.type == "cuda":
                mib = measure_memory(p, steps, hidden, device, args.chunk, amp, kind)
            else:  # a fresh process each: the allocator's high-water mark is per process
                cmd = [sys.executable, __file__, "--memory-one", f"{p},{steps},{hidden},{kind}", "--chunk",
                       str(args.chunk),
                       "--device", args.device] + (["--amp", args.amp] if args.amp else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                mib = json.loads(out.strip().splitlines()[-1])["mib"]
            cells.append(f"{mib:>16,.0f}")
        print(f"{hidden:>4} {steps:>5} | " + " | ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="hidden 128/256, 1 layer, unidirectional only")
    p.add_argument("--cells", default=None,
                   help=f"comma-separated, of {', '.join(CELLS)} (default: lstm,gru; lstm with --quick)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bfloat16 autocast for every path")
    p.add_argument("--paths", default="abcd", help="columns to run, a subset of abcdefgh in order (a is required)")
    p.add_argument("--chunk", type=int, default=compiling.CHUNK, help="time steps per compiled call, path (d)")
    p.add_argument("--memory", action="store_true", help="peak memory of a training step at T=100 and T=1000")
    p.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="sequence length")
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--default-heap", action="store_true",
                   help="leave glibc's allocator as it is (by default every path reuses freed memory, as "
                        "python -m rnnsearch does: rnnsearch.heap)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    torch.manual_seed(0)
    if args.memory_one:
        path, steps, hidden, kind = args.memory_one.split(",")
        print(json.dumps({"mib": measure_memory(path, int(steps), int(hidden), device, args.chunk, amp, kind)}))
    elif args.memory:
        memory_table(args, device, amp)
    else:
        if not args.paths.startswith("a") or set(args.paths) - set(PATHS):
            p.error(f"--paths must start with a and use only {', '.join(PATHS)}")
        args.cells = args.cells or ("lstm" if args.quick else "lstm,gru")
        unknown = [c for c in args.cells.split(",") if c not in CELLS]
        if unknown:
            p.error(f"--cells: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(CELLS)}")
        if args.rounds < 1 or args.iters < 1:
            p.error(f"--rounds and --iters must be at least 1, got {args.rounds} and {args.iters}")
        # The same allocator for every path: otherwise a path pays page faults or not depending on which
        # path ran before it (a torch.nn.LSTM step at H=256: 16,400 faults alone, none after the eager path).
        args.heap_kept = not args.default_heap and keep_freed_memory()
        speed_table(args, device, amp)


if __name__ == "__main__":
    main()
