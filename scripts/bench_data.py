"""Data speed: how much of a training step goes to making and batching a task's data.

For each task at its default settings (``conf/task/NAME.yaml``) and the default
model (LSTM, 1×64, batch 64) this measures

* ``gen_s`` — building all three splits once (generation, or loading a data
  set: scikit-learn's digits, the chorales' on-disk cache), a once-per-run cost;
* ``batch_ms`` — drawing one shuffled, padding-trimmed batch on the device (median);
* ``step_ms`` — one training step (forward, backward, clip, Adam) on such batches (median);

and prints ``batch %`` = batch_ms / step_ms, ``gen %`` = gen_s spread over the
steps of a default run (``train.epochs`` of ``conf/config.yaml``) / step_ms, and
their sum ``data %``: the share of a training step that goes to data (target: < 5%).

Run: ``python scripts/bench_data.py [--tasks adding copy ...] [--device cpu|cuda] [--threads 1] [--steps 30]``.
The chorales row needs music21 and parses the corpus on its first run (minutes;
then it reads the cache).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rnnsearch.model import build_model
from rnnsearch.tasks import SPLITS, create_task, list_tasks
from rnnsearch.train import make_optimizer, resolve_device

CONF = Path(__file__).resolve().parents[1] / "conf"


def default_cfg(task: str) -> dict:
    cfg = OmegaConf.create({"cell": OmegaConf.load(CONF / "cell" / "lstm.yaml"),
                            "model": OmegaConf.load(CONF / "model" / "default.yaml"),
                            "task": OmegaConf.load(CONF / "task" / f"{task}.yaml"),
                            "optim": OmegaConf.load(CONF / "optim" / "adam.yaml")})
    return OmegaConf.to_container(cfg, resolve=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, device: torch.device, batch_size: int, steps: int, epochs: int) -> dict[str, float]:
    cfg = default_cfg(name)
    t0 = time.perf_counter()
    task = create_task(cfg["task"])
    for s in SPLITS:
        task.split(s, device)
    _ = task.baseline  # some tasks measure their baseline on the data
    sync(device)
    gen_s = time.perf_counter() - t0

    g = torch.Generator().manual_seed(0)
    draws: list[float] = []
    while len(draws) < 50:  # median time to draw one batch, over whole epochs
        it = task.batches("train", batch_size, device, shuffle=True, generator=g)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            sync(device)
            if batch is None:
                break
            draws.append(time.perf_counter() - t0)
    batch_ms = statistics.median(draws) * 1e3

    torch.manual_seed(0)
    model = build_model(cfg, task.input_size, task.output_size, per_step=task.per_step,
                        token_input=task.token_input).to(device)
    opt = make_optimizer(cfg["optim"], model.parameters())
    times = []
    batches = iter(())
    for i in range(steps + 3):
        batch = next(batches, None)
        if batch is None:
            batches = task.batches("train", batch_size, device, shuffle=True, generator=g)
            batch = next(batches)
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(batch.x, batch.lengths), batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(device)
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    step_ms = statistics.median(times) * 1e3
    run_steps = math.ceil(task.sizes["train"] / batch_size) * epochs
    gen_pct = gen_s * 1e3 / run_steps / step_ms * 100
    batch_pct = batch_ms / step_ms * 100
    return {"gen_s": gen_s, "steps/run": run_steps, "batch_ms": batch_ms, "step_ms": step_ms,
            "batch %": batch_pct, "gen %": gen_pct, "data %": batch_pct + gen_pct}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="*", default=None, help="tasks to measure (default: all registered)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these small models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per task")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = args.tasks or list_tasks()
    if "chorales" in names and args.tasks is None and importlib.util.find_spec("music21") is None:
        names = [n for n in names if n != "chorales"]
        print("(chorales skipped: music21 is not installed; pip install 'rnnsearch[music]')")
    epochs = int(OmegaConf.load(CONF / "config.yaml").train.epochs)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, LSTM 1x64, "
          f"{epochs} epochs a run")
    cols = ["gen_s", "steps/run", "batch_ms", "step_ms", "batch %", "gen %", "data %"]
    print(f"{'task':<11}" + "".join(f"{c:>12}" for c in cols))
    for name in names:
        r = bench(name, device, args.batch_size, args.steps, epochs)
        cells = [f"{r[c]:.2f}" if c in ("gen_s", "step_ms", "batch_ms", "batch %", "gen %", "data %") else str(r[c])
                 for c in cols]
        print(f"{name:<11}" + "".join(f"{c:>12}" for c in cells), flush=True)
    print("gen_s is paid once per run (splits are built once, then batches are slices); gen % spreads it over the run.")


if __name__ == "__main__":
    main()
