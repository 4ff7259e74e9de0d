"""Benchmark the default sweep: what pruning saves, and what a second worker adds.

    python scripts/bench_sweep.py                      # both comparisons, the default sweep as shipped
    python scripts/bench_sweep.py --only pruning --samplers random --pruners median,hyperband --json b.json

Runs the real command line (``python -m rnnsearch +sweep tracking=none ...``)
in a fresh temporary directory per run, then reads each study back from its
journal file:

* pruning: the default pruner (median) vs ``sweep.pruner=none``, one worker,
  the same sampler seed: total epochs trained, best value, wall time. With the
  random sampler both runs try exactly the same compositions, which isolates
  the pruner's effect; with TPE (the default) the sampler also reacts to the
  pruned results, which is what a user gets.
* workers: ``sweep.workers=1`` vs ``2`` on the same ``--workers-trials``
  compositions (drawn once from the default space with a fixed seed and
  enqueued, pruner off, so both runs train exactly the same models): trials
  per hour from the first trial's start to the last trial's end, and for the
  whole command (Python start-up and worker spawning included).

On a shared machine the timings move with the load: the script prints the
load average next to each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState


def run_sweep(args: list[str], label: str, threads: int | None = None) -> dict[str, Any]:
    """One ``python -m rnnsearch +sweep`` run in a temp dir (``threads``: OMP_NUM_THREADS); returns its figures."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as cwd:
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rnnsearch", "+sweep", "tracking=none", "sweep.progress=plain",
                               "sweep.study_name=bench", *args], cwd=cwd, text=True, capture_output=True, env=env)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{label}: the sweep failed (status {done.returncode}):\n{done.stderr[-3000:]}")
        study = optuna.load_study(study_name="bench",
                                  storage=JournalStorage(JournalFileBackend(str(Path(cwd) / "bench.journal"))))
        trials = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        start = min(t.datetime_start for t in trials)
        end = max(t.datetime_complete for t in trials)
        span = (end - start).total_seconds()
        best = min(complete, key=lambda t: t.value) if complete else None
        return {
            "label": label, "args": args, "trials": len(trials), "complete": len(complete),
            "pruned": len(trials) - len(complete),
            "failed": sum(t.state == TrialState.FAIL for t in study.trials),
            "epochs": sum(int(t.user_attrs.get("epochs", 0)) for t in trials),
            "best_value": best.value if best else None, "best_trial": best.user_attrs.get("run_name") if best else None,
            "best_params": best.params if best else None,
            "sweep_seconds": round(span, 1), "command_seconds": round(wall, 1),
            "trials_per_hour": round(len(trials) / span * 3600, 1) if span > 0 else None,
            "trials_per_hour_command": round(len(trials) / wall * 3600, 1),
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
        }


def fixed_compositions(n: int, seed: int) -> str:
    """``n`` compositions from the default search space, as a Hydra list for ``sweep.enqueue``."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        cell = rng.choice(["rnn", "lstm", "gru"])
        wrapper = rng.choice(["none", "dropout"])
        c = {"cell.name": cell, "model.num_layers": rng.choice([1, 2]), "model.bidirectional": rng.choice([False, True]),
             "model.hidden_size": rng.choice([16, 32, 64]), "model.wrappers.0.name": wrapper,
             "optim.lr": round(10 ** rng.uniform(-3, math.log10(3e-2)), 5)}
        if cell == "lstm":
            c["cell.forget_bias"] = round(rng.uniform(0, 2), 3)
        if wrapper == "dropout":
            c["model.wrappers.0.output_keep_prob"] = round(rng.uniform(0.7, 1.0), 3)
        items.append(c)
    return hydra_list(items)


def hydra_list(items: list[dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    # nested maps (cell: {name: gru}) because Hydra's grammar has no dotted keys
    out = []
    for item in items:
        tree: dict[str, Any] = {}
        for key, v in item.items():
            node = tree
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v

        def render(node: Any) -> str:
            if isinstance(node, dict):
                return "{" + ",".join(f"{k}:{render(v)}" for k, v in node.items()) + "}"
            return value(node)

        out.append(render(tree))
    return "[" + ",".join(out) + "]"


def show(r: dict[str, Any]) -> None:
    best = "-" if r["best_value"] is None else f"{r['best_value']:.5f} ({r['best_trial']})"
    print(f"  {r['label']:<28} trials {r['trials']:>3} ({r['pruned']} pruned, {r['failed']} failed)  "
          f"epochs {r['epochs']:>4}  best {best}  sweep {r['sweep_seconds']:.0f}s "
          f"({r['trials_per_hour']} trials/h; command {r['command_seconds']:.0f}s, {r['trials_per_hour_command']} "
          f"trials/h)  load {r['load_before']}->{r['load_after']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-trials", type=int, default=None, help="sweep.n_trials (default: the sweep file's)")
    parser.add_argument("--seed", type=int, default=0, help="sweep.seed")
    parser.add_argument("--samplers", default="tpe,random", help="samplers for the pruning comparison")
    parser.add_argument("--pruners", default="median", help="pruners compared with none")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the workers comparison (timings are noisy)")
    parser.add_argument("--only", choices=("pruning", "workers"), default=None)
    parser.add_argument("--workers-trials", type=int, default=12, help="compositions in the workers comparison")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    a = parser.parse_args()
    common = [f"sweep.seed={a.seed}", *([f"sweep.n_trials={a.n_trials}"] if a.n_trials else []), *a.overrides]
    results: dict[str, Any] = {"cpu_count": os.cpu_count(), "pruning": [], "workers": []}
    if a.only in (None, "pruning"):
        print(f"pruning: {a.pruners} vs none, 1 single-threaded worker (epochs and best values do not depend on "
              f"the machine's load; the times do)")
        for sampler in a.samplers.split(","):
            runs = {p: run_sweep([*common, f"sweep.sampler={sampler}", f"sweep.pruner={p}", "sweep.workers=1"],
                                 f"{sampler}, pruner={p}", threads=1) for p in ["none", *a.pruners.split(",")]}
            for r in runs.values():
                show(r)
            base = runs["none"]
            for p, r in runs.items():
                if p != "none":
                    saved = 1 - r["epochs"] / base["epochs"]
                    print(f"  -> {sampler}, {p}: {saved:.0%} fewer epochs than without pruning; best "
                          f"{r['best_value']:.5f} vs {base['best_value']:.5f}", flush=True)
                    results["pruning"].append({"sampler": sampler, "pruner": p, "run": r, "none": base,
                                               "epochs_saved": round(saved, 3)})
    if a.only in (None, "workers"):
        print(f"workers: 1 vs 2 on the same {a.workers_trials} compositions (pruner off)")
        fixed = [f"sweep.seed={a.seed}", f"sweep.n_trials={a.workers_trials}", "sweep.pruner=none",
                 f"sweep.enqueue={fixed_compositions(a.workers_trials, a.seed)}", *a.overrides]
        runs = []
        for _ in range(a.repeat):
            runs += [run_sweep([*fixed, "sweep.workers=1"], "workers=1 (torch threads: all cores)"),
                     run_sweep([*fixed, "sweep.workers=1"], "workers=1 (1 torch thread)", threads=1),
                     run_sweep([*fixed, "sweep.workers=2"], "workers=2 (1 torch thread each)")]
            for r in runs[-3:]:
                show(r)
            one, two = runs[-2], runs[-1]
            if one["trials_per_hour"] and two["trials_per_hour"]:
                print(f"  -> 2 workers: {two['trials_per_hour'] / one['trials_per_hour']:.2f}x the trials/hour of 1 "
                      f"single-threaded worker (command: {two['trials_per_hour_command'] / one['trials_per_hour_command']:.2f}x)",
                      flush=True)
        results["workers"] = runs
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
