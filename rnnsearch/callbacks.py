"""Training-loop hooks: how pruning, tracking and progress plug into :func:`rnnsearch.train.fit`.

A callback receives the run's description when training starts, each epoch's
metrics, and the result at the end. It may raise :class:`StopTraining` to end
training early and keep the result, or any other exception (e.g. Optuna's
``TrialPruned``) to abort it; the loop itself imports neither Optuna nor MLflow.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch, keeping the result."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Callback:
    """Base class: override the hooks you need (all optional)."""

    def on_train_begin(self, info: dict[str, Any]) -> None:
        """``info`` has ``model``, ``task``, ``cfg``, ``params``, ``device``."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Called after validation; ``metrics`` has ``train/loss``, ``val/loss``, ``val/<metric>``, timings."""

    def on_train_end(self, result: dict[str, Any]) -> None:
        """Called once with the final result (also after :class:`StopTraining`)."""

    def on_train_abort(self, exc: BaseException) -> None:
        """Called once when training ends by an exception (divergence, pruning, Ctrl-C, a bug); it is re-raised."""


class EpochPrinter(Callback):
    """Prints one line per epoch (the CLI's progress display)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.epochs = 0

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self.epochs = info.get("epochs", 0)
        model = info["model"]
        path = "fused torch.nn" if getattr(model, "fused", False) else "cell-by-cell"
        how = ""
        if not getattr(model, "fused", False) and info.get("compile"):  # model.compile's decision, and why
            how = f" ({'compiled' if info.get('compiled') else 'eager'}: {info['compile']})"
        print(f"task {info['task'].describe()}", file=self.stream)
        print(f"model: {info['params']:,} parameters, {path} path, on {info['device']}{how}", file=self.stream,
              flush=True)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if k.startswith(("train/", "val/")))
        print(f"epoch {epoch:>3}/{self.epochs}  {shown}  ({metrics['epoch_seconds']:.1f}s, "
              f"{metrics['tokens_per_s']:,.0f} tok/s)", file=self.stream, flush=True)
