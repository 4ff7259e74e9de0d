"""Training-speed benchmark: hand-written torch.nn vs rnnsearch's fused and cell-by-cell paths.

For each configuration it times full training steps (forward, backward, Adam)
on random data — batch 64, length 100, input 32, a linear head on the last step
and MSE — and prints tokens/s of

  (a) a hand-written ``torch.nn.LSTM``/``GRU`` + ``Linear`` loop (the baseline),
  (b) ``build_model(..., fused=always)`` — rnnsearch's fused path,
  (c) ``build_model(..., fused=never)`` — the registry cell run step by step (eager),

with (b)/(a) and (c)/(a), plus the achieved GFLOP/s of (a) against the float32
GEMM throughput measured on the same machine in the same run. Timing alternates
the paths in rounds and keeps each path's best round, so background load on
the machine hurts all paths alike.

    python scripts/bench.py                 # LSTM/GRU, hidden 128/256, 1-2 layers, uni/bi
    python scripts/bench.py --quick         # LSTM, hidden 128 and 256, 1 layer (issue 2's table)
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
from torch import nn

from rnnsearch import build_model


def gemm_gflops(n: int = 1024, reps: int = 20) -> float:
    """Float32 matmul throughput of this machine (GFLOP/s), best of a few rounds."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


class Baseline(nn.Module):
    """The hand-written reference: torch.nn recurrent module + linear head on the last step."""

    def __init__(self, kind: str, input_size: int, hidden: int, layers: int, bidirectional: bool) -> None:
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = cls(input_size, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 1)

    def forward(self, x: torch.Tensor, lengths: None = None) -> torch.Tensor:
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h
        last = torch.cat([h[-2], h[-1]], -1) if self.rnn.bidirectional else h[-1]
        return self.head(last)


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x, None), y)
        loss.backward()
        opt.step()

    return step


def step_flops(kind: str, batch: int, steps: int, inp: int, hidden: int, layers: int, bi: bool) -> float:
    """Matmul FLOPs of one training step (forward + backward ≈ 3 × forward)."""
    gates = {"lstm": 4, "gru": 3}[kind]
    dirs = 2 if bi else 1
    total, width = 0.0, inp
    for _ in range(layers):
        total += dirs * 2 * batch * steps * gates * hidden * (width + hidden)
        width = hidden * dirs
    return 3 * total


def time_paths(steps: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, float]:
    """Best seconds per step of each path, alternating paths round by round."""
    for fn in steps.values():  # warm-up
        fn()
        fn()
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / iters)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="LSTM, hidden 128/256, 1 layer, unidirectional only")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="sequence length")
    p.add_argument("--input", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    peak = gemm_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 GEMM peak {peak:.1f} GFLOP/s")
    print(f"batch {args.batch}, length {args.steps}, input {args.input}; training step = forward + backward + Adam\n")
    grid = (itertools.product(["lstm"], [128, 256], [1], [False]) if args.quick
            else itertools.product(["lstm", "gru"], [128, 256], [1, 2], [False, True]))
    header = f"{'cell':<5} {'H':>4} {'L':>2} {'dir':>3} | {'(a) tok/s':>10} {'GFLOP/s':>8} {'%peak':>6} | {'(b) fused':>9} {'(b)/(a)':>7} | {'(c) cell':>9} {'(c)/(a)':>7}"
    print(header)
    print("-" * len(header))
    x = torch.randn(args.batch, args.steps, args.input)
    y = torch.randn(args.batch, 1)
    for kind, hidden, layers, bi in grid:
        cfg = {"cell": {"name": kind}, "model": {"hidden_size": hidden, "num_layers": layers, "bidirectional": bi,
                                                 "embedding_size": 0, "fused": "always"}}
        if kind == "lstm":
            cfg["cell"]["forget_bias"] = 0.0
        fused = build_model(cfg, args.input, 1)
        cfg["model"]["fused"] = "never"
        cell = build_model(cfg, args.input, 1)
        paths = {"a": make_step(Baseline(kind, args.input, hidden, layers, bi), x, y),
                 "b": make_step(fused, x, y), "c": make_step(cell, x, y)}
        t = time_paths(paths, args.rounds, args.iters)
        tok = {k: args.batch * args.steps / v for k, v in t.items()}
        gflops = step_flops(kind, args.batch, args.steps, args.input, hidden, layers, bi) / t["a"] / 1e9
        print(f"{kind:<5} {hidden:>4} {layers:>2} {'bi' if bi else 'uni':>3} | {tok['a']:>10,.0f} {gflops:>8.1f} "
              f"{100 * gflops / peak:>5.0f}% | {tok['b']:>9,.0f} {tok['b'] / tok['a']:>7.2f} | "
              f"{tok['c']:>9,.0f} {tok['c'] / tok['a']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
