"""Tracking overhead per trial: the default config trained with and without MLflow tracking, in one process.

First an untracked warm-up, then one 'cold' tracked run (imports mlflow and creates the SQLite store, once per
process), then N alternating untracked / tracked pairs (what each further trial of a sweep costs).
Wall time with tracking includes waiting for the tracking thread to finish (flush), i.e. the worst case.
"""
import json
import sys
import tempfile
import time

from hydra import compose, initialize_config_dir
from rnnsearch.cli import CONF_DIR
from rnnsearch.train import train
from rnnsearch.tracking import tracking_callbacks, flush
import torch

n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
extra = sys.argv[2:]
tmp = tempfile.mkdtemp()
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    on = compose("config", overrides=[f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])
    off = compose("config", overrides=["tracking=none", *extra])

def one(mode, label):
    cfg = on if mode == "on" else off
    cbs = tracking_callbacks(cfg, run_name=label)
    t0 = time.perf_counter()
    r = train(cfg, callbacks=cbs)
    t_train = time.perf_counter() - t0
    flush()
    row = dict(label=label, mode=mode, train_s=t_train, with_flush_s=time.perf_counter() - t0,
               **(cbs[0].stats.as_dict() if cbs else {}))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row

print("device", torch.cuda.get_device_name() if torch.cuda.is_available() and "device=cpu" not in extra else "cpu",
      "threads", torch.get_num_threads(), "overrides", extra, flush=True)
one("off", "warm-up")
cold = one("on", "cold")
rows = [one(m, f"pair{i}") for i in range(n) for m in ("off", "on")]
mean = lambda xs: sum(xs) / len(xs)
offs = [r for r in rows if r["mode"] == "off"]; ons = [r for r in rows if r["mode"] == "on"]
base = mean([r["train_s"] for r in offs])
print(f"SUMMARY {extra}: untracked trial {base:.3f}s (min {min(r['train_s'] for r in offs):.3f}); "
      f"tracked trial {mean([r['train_s'] for r in ons]):.3f}s, incl. flush {mean([r['with_flush_s'] for r in ons]):.3f}s "
      f"-> overhead {100 * (mean([r['train_s'] for r in ons]) / base - 1):+.2f}% ({100 * (mean([r['with_flush_s'] for r in ons]) / base - 1):+.2f}% incl. flush); "
      f"training thread in hooks {1000 * mean([r['caller_s'] for r in ons]):.2f} ms ({100 * mean([r['caller_s'] for r in ons]) / base:.3f}%); "
      f"tracking thread {1000 * mean([r['worker_s'] for r in ons]):.0f} ms wall / {1000 * mean([r['worker_cpu_s'] for r in ons]):.0f} ms CPU per trial; "
      f"cold first run {cold['train_s']:.3f}s train, {cold['with_flush_s']:.3f}s incl. flush (import mlflow + new store)", flush=True)
