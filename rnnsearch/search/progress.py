"""The sweep's live progress: trials done / pruned / failed / running, best so far, ETA.

On a terminal it is a `rich` live panel, redrawn from the storage about once a
second (so it shows every worker's trials, on any machine); when stdout is not a
terminal (CI, a log file) it prints one plain line per finished trial instead.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Optional, TextIO

from optuna.trial import FrozenTrial, TrialState

STATE_MARK = {TrialState.COMPLETE: "done", TrialState.PRUNED: "pruned", TrialState.FAIL: "FAILED"}


def fmt_seconds(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def trial_label(t: FrozenTrial) -> str:
    return str(t.user_attrs.get("run_name") or f"t{t.number:03d}")


class SweepProgress:
    """Counts and best-so-far of a study, shown live or as plain lines.

    Args:
        n_trials: the study's target total (complete + pruned).
        objectives, directions: names and directions of the objective values.
        start_number: first trial number of this run (the ETA uses this run's pace).
        mode: ``auto`` (live on a terminal, else plain), ``live``, ``plain`` or ``none``.
    """

    def __init__(self, study_name: str, n_trials: int, objectives: Sequence[str], directions: Sequence[str],
                 start_number: int, workers: int, mode: str = "auto", stream: Optional[TextIO] = None) -> None:
        self.study_name = study_name
        self.n_trials = n_trials
        self.objectives = list(objectives)
        self.directions = list(directions)
        self.start_number = start_number
        self.workers = workers
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "live" if getattr(self.stream, "isatty", lambda: False)() else "plain"
        self.mode = mode
        self.t0 = time.monotonic()
        self.seen: set[int] = set()
        self._lock = threading.Lock()
        self._live: Any = None
        self.counts: dict[str, int] = {}
        self.best: Optional[FrozenTrial] = None

    # -- state ---------------------------------------------------------------------------
    def _stats(self, trials: Sequence[FrozenTrial]) -> None:
        c = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "run_done": 0}
        for t in trials:
            if t.state == TrialState.COMPLETE:
                c["complete"] += 1
            elif t.state == TrialState.PRUNED:
                c["pruned"] += 1
            elif t.state == TrialState.FAIL:
                c["failed"] += 1
            elif t.state == TrialState.RUNNING:
                c["running"] += 1
            if t.number >= self.start_number and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                c["run_done"] += 1
        self.counts = c
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        if done and len(self.objectives) == 1:
            sign = 1 if self.directions[0] == "minimize" else -1
            self.best = min(done, key=lambda t: sign * t.values[0])

    def eta(self) -> Optional[float]:
        c = self.counts
        remaining = self.n_trials - c.get("complete", 0) - c.get("pruned", 0)
        if remaining <= 0:
            return 0.0
        if not c.get("run_done"):
            return None
        return (time.monotonic() - self.t0) / c["run_done"] * remaining

    def summary(self) -> str:
        c = self.counts
        done = c.get("complete", 0) + c.get("pruned", 0)
        best = ""
        if self.best is not None:
            best = f" | best: {self.objectives[0]}={fmt_value(self.best.values[0])} ({trial_label(self.best)})"
        return (f"[{done:>{len(str(self.n_trials))}}/{self.n_trials}] {c.get('complete', 0)} complete, "
                f"{c.get('pruned', 0)} pruned, {c.get('failed', 0)} failed, {c.get('running', 0)} running{best}"
                f" | elapsed {fmt_seconds(time.monotonic() - self.t0)}, ETA {fmt_seconds(self.eta())}")

    @staticmethod
    def describe(t: FrozenTrial, objectives: Sequence[str]) -> str:
        what = STATE_MARK.get(t.state, t.state.name.lower())
        if t.state == TrialState.COMPLETE and t.values:
            what += " " + " ".join(f"{k}={fmt_value(v)}" for k, v in zip(objectives, t.values))
        elif t.user_attrs.get("reason"):
            what += f" ({str(t.user_attrs['reason'])[:120]})"
        epochs = t.user_attrs.get("epochs")
        sec = t.user_attrs.get("seconds")
        extra = ", ".join(x for x in (f"{epochs} epochs" if epochs is not None else "",
                                      f"{sec:.1f}s" if isinstance(sec, (int, float)) else "") if x)
        return f"trial {t.number} {trial_label(t)}: {what}" + (f" [{extra}]" if extra else "")

    # -- display -------------------------------------------------------------------------
    def start(self) -> None:
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._render([]), console=Console(file=self.stream), refresh_per_second=4,
                              transient=False)
            self._live.start()

    def update(self, trials: Sequence[FrozenTrial]) -> None:
        """Show the study's current trials (call about once a second, or after each trial)."""
        with self._lock:
            self._stats(trials)
            new = sorted((t for t in trials if t.state.is_finished() and t.number not in self.seen),
                         key=lambda t: t.number)
            for t in new:
                self.seen.add(t.number)
            if self.mode == "plain":
                for t in new:
                    if t.number >= self.start_number:
                        print(f"{self.describe(t, self.objectives)}  {self.summary()}", file=self.stream, flush=True)
            elif self.mode == "live" and self._live is not None:
                self._live.update(self._render(trials))

    def _render(self, trials: Sequence[FrozenTrial]) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        c = self.counts
        done = c.get("complete", 0) + c.get("pruned", 0)
        head = Table.grid(padding=(0, 1))
        head.add_row(Text(f"sweep {self.study_name}", style="bold"),
                     ProgressBar(total=self.n_trials, completed=min(done, self.n_trials), width=30),
                     Text(self.summary()))
        recent = sorted((t for t in trials if t.state.is_finished() and t.number >= self.start_number),
                        key=lambda t: t.datetime_complete or t.datetime_start or 0)[-5:]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        lines = [Text("  " + self.describe(t, self.objectives),
                      style={"done": "green", "pruned": "yellow"}.get(STATE_MARK.get(t.state, ""), "red"))
                 for t in recent]
        lines += [Text(f"  trial {t.number} {trial_label(t)}: running, epoch "
                       f"{max(t.intermediate_values, default=0)}", style="cyan") for t in running]
        return Group(head, *lines)

    def close(self) -> None:
        with self._lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
